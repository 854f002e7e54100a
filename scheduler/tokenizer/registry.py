"""Tokenizers by the spec a worker announces in ``Hello.tokenizer``, loaded once and cached.

A spec is ``"byte"`` or a model directory on the worker's disk. Workers also send the tokenizer's
files (``TokenizerFiles``); those are kept in a private directory and preferred, so the scheduler
tokenizes exactly as the engine does even when it cannot see the worker's disk.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from scheduler.tokenizer.base import Tokenizer
from scheduler.tokenizer.byte_level import ByteTokenizer
from transport.errors import ErrorCode, PdorchError
from transport.messages import TOKENIZER_FILES


class TokenizerRegistry:
    def __init__(self) -> None:
        self._cache: dict[str, Tokenizer] = {}
        self._received: dict[str, Path] = {}
        self._root: Path | None = None

    def provide(self, spec: str, files: dict[str, bytes]) -> None:
        """Keep a worker's tokenizer files for ``spec`` (same content is stored once)."""
        unknown = set(files) - set(TOKENIZER_FILES)
        if unknown or "tokenizer.json" not in files:
            raise PdorchError(
                ErrorCode.BAD_MESSAGE, f"tokenizer files must include tokenizer.json; got {sorted(files)}"
            )
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="pdorch-tokenizers-"))
        folder = self._root / digest.hexdigest()[:32]
        if not folder.exists():
            staging = Path(tempfile.mkdtemp(dir=self._root))
            for name, data in files.items():
                (staging / name).write_bytes(data)
            staging.rename(folder)
        if self._received.get(spec) != folder:
            self._received[spec] = folder
            self._cache.pop(spec, None)

    def get(self, spec: str) -> Tokenizer:
        tok = self._cache.get(spec)
        if tok is None:
            if spec == "byte":
                tok = ByteTokenizer()
            else:
                # A model directory with tokenizer.json; needs the 'tokenizers' package.
                from scheduler.tokenizer.hf import load_tokenizer

                local = self._received.get(spec)
                try:
                    tok = load_tokenizer(str(local) if local is not None else spec)
                except PdorchError as e:
                    raise PdorchError(
                        ErrorCode.NO_WORKER, f"the tokenizer {spec!r} is not available yet: {e.message}"
                    ) from None
            self._cache[spec] = tok
        return tok

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
