"""What each engine package's ``cli`` module gives ``pdorch worker``: its flags, and how to build it.

``workers/main.py`` adds every engine's flags to the parser, so ``--help`` lists them all, but builds
only the chosen engine. A ``cli`` module therefore imports nothing heavy at its top: ``build`` imports
the engine itself, so a worker never loads another engine's code (vLLM's client, numpy models...).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Protocol

import zmq

from transport.kv import KvReceiver, KvSender
from transport.security import Security
from workers.engines.base import Engine

# The agent's --accelerator default; an engine that models an accelerator class may report that one.
DEFAULT_ACCELERATOR = "cpu"


@dataclass(frozen=True)
class AgentParts:
    """What the agent shares with the engine it builds: its ZeroMQ context and keys, and the KV
    plane's sender and receiver when the engine moves its KV in this process (``MOVES_KV``)."""

    ctx: zmq.Context
    security: Security
    kv_sender: KvSender | None = None
    kv_receiver: KvReceiver | None = None


class EngineCli(Protocol):
    # Whether the engine moves its KV through pdorch's KV plane in this process; if so the agent
    # gives it the sender and receiver its role needs (in ``AgentParts``).
    MOVES_KV: bool

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add the engine's own flags to ``group`` (an argument group named for the engine)."""
        ...

    def build(self, args: argparse.Namespace, parts: AgentParts) -> Engine: ...

    def accelerator(self, args: argparse.Namespace) -> str:
        """The accelerator class label the worker reports to the scheduler."""
        ...
