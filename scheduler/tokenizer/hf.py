"""Hugging Face tokenizers: ``tokenizer.json`` read with the ``tokenizers`` library, the model's chat
template rendered with jinja2, and incremental detokenization.

A model directory holds ``tokenizer.json`` and usually ``tokenizer_config.json`` (special tokens
and, in older layouts, the chat template); newer layouts keep the template in
``chat_template.jinja`` or ``chat_template.json``. All three are understood.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HfTokenizer

from scheduler.tokenizer.base import GIL_FREE_CHARS, Tokenizer
from scheduler.tokenizer.byte_level import ByteTokenizer
from transport.errors import ErrorCode, PdorchError

REPLACEMENT_CHAR = "\ufffd"
# A normalizer may merge characters (NFKC composes some pairs): leave room for it in the bound
# on characters per token.
_NORMALIZER_ROOM = 4


class HfIncrementalDecoder:
    """Text deltas for a growing token stream, correct across merged and multi-byte tokens.

    Decoding token by token is wrong for byte-level BPE (one character may span several tokens)
    and for tokenizers whose decoders depend on neighbours (leading-space rules). So each step
    decodes a small window of recent tokens twice, without and with the new ones, and emits the
    difference; a window that ends in an incomplete character (U+FFFD) is held back.
    """

    def __init__(self, tokenizer: _HfTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        # ids[prefix:read] were already emitted and give the decoder its left context.
        self._prefix = 0
        self._read = 0

    def _text(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=True)

    def feed(self, token_ids: list[int]) -> str:
        out: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            before = self._text(self._prefix, self._read)
            after = self._text(self._prefix, len(self._ids))
            if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
                out.append(after[len(before) :])
                self._prefix = self._read
                self._read = len(self._ids)
        return "".join(out)

    def flush(self) -> str:
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if after.startswith(before) else after


def _special_token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot read {path.name}: {e}") from None
    return data if isinstance(data, dict) else {}


def _pick_template(value: Any) -> str | None:
    """A template string, or the one named "default" from a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    from_json = _pick_template(_read_json(model_dir / "chat_template.json").get("chat_template"))
    return from_json if from_json is not None else _pick_template(config.get("chat_template"))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class HfTokenizer:
    """The :class:`~scheduler.tokenizer.base.Tokenizer` of a Hugging Face model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise PdorchError(ErrorCode.CONFIG, f"no tokenizer.json in {self.model_dir}")
        try:
            self._tok = _HfTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the library raises plain Exception subclasses
            raise PdorchError(ErrorCode.CONFIG, f"cannot load {tokenizer_file}: {e}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.max_token_chars = _NORMALIZER_ROOM * max(map(len, vocab), default=1)
        config = _read_json(self.model_dir / "tokenizer_config.json")
        self.bos_token = _special_token_content(config.get("bos_token")) or ""
        self.eos_token = _special_token_content(config.get("eos_token")) or ""
        self.eos_token_id = self._eos_id(config)
        source = _find_chat_template(self.model_dir, config)
        self._template = None
        if source is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateError as e:
                raise PdorchError(ErrorCode.CONFIG, f"bad chat template: {e}") from None

    def _eos_id(self, config: dict[str, Any]) -> int:
        if self.eos_token and (eos := self._tok.token_to_id(self.eos_token)) is not None:
            return eos
        # Fall back to the model config, where the id (or the first of several) is recorded.
        for name in ("generation_config.json", "config.json"):
            value = _read_json(self.model_dir / name).get("eos_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
        return -1

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=True applies the tokenizer's own post-processor (e.g. a BOS), exactly
        # what an engine does with a text prompt.
        return self._token_ids(text, special=True)

    def _token_ids(self, text: str, special: bool) -> list[int]:
        if len(text) < GIL_FREE_CHARS:
            return self._tok.encode(text, add_special_tokens=special).ids
        return self._tok.encode_batch([text], add_special_tokens=special)[0].ids

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        if self._template is None:
            raise PdorchError(
                ErrorCode.INVALID_REQUEST, f"model in {self.model_dir.name} has no chat template"
            )
        try:
            return self._template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"chat template failed: {e}") from None

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> list[int]:
        # The template writes the special tokens itself; the post-processor must not add more.
        return self._token_ids(self.render_chat(messages), special=False)

    def decoder(self) -> HfIncrementalDecoder:
        return HfIncrementalDecoder(self._tok)

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` is the reference engine's tokenizer; anything else is a model directory (or the
    path of its ``tokenizer.json``)."""
    if spec in ("", "byte"):
        return ByteTokenizer()
    path = Path(spec)
    if path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise PdorchError(ErrorCode.CONFIG, f"tokenizer {spec!r} is neither 'byte' nor a model directory")
    return HfTokenizer(path)
