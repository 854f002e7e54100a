"""Flags shared by the engines that batch requests in the agent's process (reference and sim).

Both model a paged KV cache with continuous batching and chunked prefill, so they read the same
flags; the vLLM engine takes these settings from its own server instead.
"""

from __future__ import annotations

import argparse

TITLE = "in-process engines (reference, sim)"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--model", default="pdorch-reference", help="model name the worker serves")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--max-batch", type=int, default=64, help="max sequences per decode step")
    group.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=512,
        help="prompt tokens prefilled per engine step; longer prompts are chunked",
    )
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
