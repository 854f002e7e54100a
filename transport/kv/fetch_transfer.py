"""The decode side of one fetch from the broker: asks, waits for the broker's begin, then
receives like any receiver (same checks, same sink, same ack/nack)."""

from __future__ import annotations

import asyncio

from transport.errors import ErrorCode, PdorchError
from transport.kv.dealer_link import DealerLink
from transport.kv.in_transfer import InTransfer, KvSink, validate_begin
from transport.kv.messages import KV_PROTOCOL_VERSION, KvBegin, KvMessage, KvNack, nack_error


class FetchTransfer:
    """The receiving side of one fetch: waits for the broker's begin, then acts as a receiver."""

    def __init__(self, transfer_id: str, sink: KvSink, window_bytes: int, link: DealerLink) -> None:
        self._transfer_id = transfer_id
        self._sink = sink
        self._window_bytes = window_bytes
        self._link = link
        self._transfer: InTransfer | None = None
        self.error: PdorchError | None = None
        self.done = asyncio.Event()

    @property
    def chunks_received(self) -> int:
        return self._transfer.chunks_received if self._transfer is not None else 0

    @property
    def trailer(self) -> dict[str, int | str]:
        return self._transfer.trailer if self._transfer is not None else {}

    def handle(self, msg: KvMessage) -> None:
        if self.done.is_set():
            return
        if self._transfer is not None:
            self._transfer.handle(msg)
            if self._transfer.finished:
                self.error = self._transfer.error
                self.done.set()
        elif isinstance(msg, KvBegin):
            self._on_begin(msg)
        elif isinstance(msg, KvNack):
            self.error = nack_error(msg)
            self.done.set()

    def _on_begin(self, begin: KvBegin) -> None:
        try:
            if begin.version != KV_PROTOCOL_VERSION:
                raise PdorchError(ErrorCode.PROTOCOL_MISMATCH, f"broker speaks KV protocol {begin.version}")
            validate_begin(begin)
        except PdorchError as e:
            self.fail(e)
            return
        self._transfer = InTransfer(begin, self._sink, self._window_bytes, self._link.reply)
        self._transfer.accept()

    def fail(self, error: PdorchError) -> None:
        """Give up (deadline, bad begin) and tell the broker, which stops streaming or waiting."""
        if self.done.is_set():
            return
        self.error = error
        self.done.set()
        if self._transfer is not None:
            self._transfer.fail(error.code, error.message)
        else:
            code, message = str(error.code), error.message
            self._link.reply(KvNack(transfer_id=self._transfer_id, code=code, message=message))
