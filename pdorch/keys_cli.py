"""``pdorch keys generate DIR``: the CURVE keys of a cluster (see docs/operations.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transport.errors import PdorchError
from transport.security.key_set import KeySet

# The Kubernetes pools of manifests/: one key per pool, claiming the pool's pod names.
DEFAULT_WORKERS = ("prefill=pdorch-prefill-*", "decode=pdorch-decode-*")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pdorch keys",
        description="Make the CURVE keys of a cluster: the scheduler's, the KV broker's, one per "
        "worker (or pool of workers), and the trusted directory every process reads.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="make a new key set in a new directory")
    gen.add_argument("directory", type=Path)
    gen.add_argument(
        "--worker",
        action="append",
        metavar="NAME[=CLAIMS]",
        help="a worker key and the worker ids it may register as (comma-separated globs; default "
        f"its name); repeatable. Default: {' '.join(DEFAULT_WORKERS)} (the Kubernetes pools)",
    )
    return p.parse_args(argv)


def _workers(specs: list[str]) -> dict[str, tuple[str, ...]]:
    workers: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, _, claims = spec.partition("=")
        workers[name] = tuple(c.strip() for c in claims.split(",") if c.strip())
    return workers


def keys_main(argv: list[str]) -> int:
    args = _parse(argv)
    directory: Path = args.directory
    if directory.exists() and any(directory.iterdir()):
        print(f"error: {directory} is not empty; keys are never overwritten", file=sys.stderr)
        return 2
    try:
        keys = KeySet.create(directory, _workers(args.worker or list(DEFAULT_WORKERS)))
    except PdorchError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    names = sorted(p.stem for p in directory.glob("*.key"))
    print(f"keys for {', '.join(names)} in {directory}; trusted public keys in {keys.trusted_dir}")
    print("each process: PDORCH_KEY_FILE=<its .key>, PDORCH_TRUSTED_KEYS=" + str(keys.trusted_dir))
    print("\nfor the Kubernetes manifests (docs/kubernetes.md):")
    print(f"  kubectl -n pdorch create secret generic pdorch-trusted-keys --from-file={keys.trusted_dir}")
    for name in names:
        print(
            f"  kubectl -n pdorch create secret generic pdorch-key-{name} --from-file={keys.key_file(name)}"
        )
    return 0
