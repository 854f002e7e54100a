"""The ``pdorch`` command: one entry point, a subcommand per process kind."""

from __future__ import annotations

import argparse
import os
import sys

# One BLAS thread per process, set before anything loads numpy: pdorch's processes share the
# machine's cores, and OpenBLAS's own thread pool makes small products ~100x slower under contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

_DESCRIPTION = """\
pdorch: prefill/decode disaggregation for LLM serving.

  pdorch up          start a local cluster (scheduler + prefill and decode workers) and wait
  pdorch scheduler   run the scheduler (OpenAI-compatible HTTP + ZeroMQ control plane)
  pdorch worker      run a worker agent beside an engine (reference or vLLM)
  pdorch kv-broker   run the KV broker for centralized KV handoff
  pdorch keys        make the CURVE keys of a cluster (pdorch keys generate DIR)
  pdorch simulate    replay a trace through the placement code in virtual time
  pdorch model       fetch (once) and list the models pdorch serves by name
"""


def _parser() -> argparse.ArgumentParser:
    from pdorch import launcher
    from scheduler import app
    from workers import main as worker

    p = argparse.ArgumentParser(
        prog="pdorch", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "up",
        help="start a local cluster on this machine",
        description="Start the scheduler, N prefill and M decode workers as separate processes on "
        "127.0.0.1, wait until ready, print the URL and an example request; Ctrl-C stops them all.",
    )
    launcher.add_arguments(up)
    sch = sub.add_parser("scheduler", help="run the scheduler")
    app.add_arguments(sch)
    wrk = sub.add_parser("worker", help="run a worker agent")
    worker.add_arguments(wrk)
    sub.add_parser("kv-broker", help="run the KV broker (centralized mode)", add_help=False)
    sub.add_parser("keys", help="make the CURVE keys of a cluster", add_help=False)
    sub.add_parser("simulate", help="simulate placement policies on a trace", add_help=False)
    sub.add_parser("model", help="fetch and list models", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # These own their argument parsing; hand them the rest of the line.
    if argv and argv[0] == "kv-broker":
        from transport.kv.broker_cli import broker_main

        return broker_main(argv[1:])
    if argv and argv[0] == "keys":
        from pdorch.keys_cli import keys_main

        return keys_main(argv[1:])
    if argv and argv[0] == "model":
        from workers.models.cli import model_main

        return model_main(argv[1:])
    if argv and argv[0] == "simulate":
        from simulate.cli import simulate_main

        return simulate_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "up":
        from pdorch import launcher

        return launcher.main(args)
    if args.command == "scheduler":
        from scheduler import app

        return app.main(args)
    if args.command == "worker":
        from workers import main as worker

        return worker.main(args)
    parser.print_help()
    return 0
