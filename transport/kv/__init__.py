"""The KV plane: moves a request's KV cache from a prefill agent to a decode agent, directly (p2p)
or through a broker (centralized), layer by layer, under credit-based flow control, with every
chunk checksummed. ``transport/PROTOCOL.md`` is the contract.

The broker server (``broker.py``, run by ``broker_cli.py``) is not exported here: agents and vLLM
workers import this package and must not load it.
"""

from transport.kv.array_sink import ArraySink
from transport.kv.in_transfer import KvSink
from transport.kv.out_stream import KvOutStream
from transport.kv.receiver import KvReceiver, KvReceiverStats
from transport.kv.sender import KvSender

__all__ = [
    "ArraySink",
    "KvOutStream",
    "KvReceiver",
    "KvReceiverStats",
    "KvSender",
    "KvSink",
]
