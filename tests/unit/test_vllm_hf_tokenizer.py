"""The Hugging Face tokenizer: a real byte-level BPE trained here, saved as tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scheduler.tokenizer.byte_level import ByteTokenizer
from scheduler.tokenizer.hf import HfTokenizer, load_tokenizer
from transport.errors import ErrorCode, PdorchError

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
TEXTS = ["hello world", "café naïve über", "東京 こんにちは", "🙂 emoji 🙂🙂", "the cache block token " * 3]


def _write_model_dir(path: Path, *, template_in: str = "config") -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["hello world, the cache block token.", "prefill decode hello"] * 50, trainer=trainer
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if template_in == "config":
        config["chat_template"] = TEMPLATE
    elif template_in == "jinja":
        (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model_dir(tmp_path_factory.mktemp("hf") / "model")


def test_round_trip_of_multibyte_text(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_incremental_decoding_never_splits_a_character(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        dec = tok.decoder()
        deltas = [dec.feed([i]) for i in ids]
        tail = dec.flush()
        assert "".join(deltas) + tail == text
        assert all("\ufffd" not in d for d in deltas)
    # The emoji is 4 bytes the small vocabulary never merged: several tokens, one character.
    assert len(tok.encode("🙂")) > 1


def test_incremental_decoding_in_uneven_batches(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    ids = tok.encode("".join(TEXTS))
    dec = tok.decoder()
    out = dec.feed(ids[:3]) + dec.feed(ids[3:4]) + dec.feed(ids[4:]) + dec.flush()
    assert out == "".join(TEXTS)


def test_flush_emits_an_incomplete_tail(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    ids = tok.encode("ab🙂")
    dec = tok.decoder()
    text = dec.feed(ids[:-1])  # the emoji's last byte is missing
    assert text == "ab"
    assert dec.flush() == "\ufffd"


def test_chat_template_from_tokenizer_config(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    rendered = tok.render_chat([("system", "be brief"), ("user", "hello")])
    assert rendered == "<s><|system|>\nbe brief<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template([("user", "hello")])
    # Special tokens in the rendered text are single ids, and the template's BOS is not doubled.
    assert ids[0] == tok._tok.token_to_id("<s>")
    assert ids.count(tok._tok.token_to_id("<s>")) == 1
    assert tok._tok.token_to_id("<|user|>") in ids


def test_chat_template_from_jinja_file(tmp_path: Path) -> None:
    tok = HfTokenizer(_write_model_dir(tmp_path / "m", template_in="jinja"))
    assert tok.render_chat([("user", "x")]).endswith("<|assistant|>\n")


def test_missing_chat_template_is_a_client_error(tmp_path: Path) -> None:
    tok = HfTokenizer(_write_model_dir(tmp_path / "m", template_in="none"))
    with pytest.raises(PdorchError) as e:
        tok.apply_chat_template([("user", "x")])
    assert e.value.code is ErrorCode.INVALID_REQUEST


def test_eos_from_tokenizer_config(model_dir: Path) -> None:
    tok = HfTokenizer(model_dir)
    assert tok.eos_token_id == tok._tok.token_to_id("</s>") >= 0


def test_load_tokenizer_specs(model_dir: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(model_dir)), HfTokenizer)
    assert isinstance(load_tokenizer(str(model_dir / "tokenizer.json")), HfTokenizer)
    with pytest.raises(PdorchError) as e:
        load_tokenizer(str(tmp_path / "nowhere"))
    assert e.value.code is ErrorCode.CONFIG
    (tmp_path / "empty").mkdir()
    with pytest.raises(PdorchError):
        load_tokenizer(str(tmp_path / "empty"))


LONG_TEXTS = [
    "hello world, the cache block token. " * 500,  # past the length at which the batch call is used
    " " * 20_000,
    "<|end|>" * 3_000,  # special tokens: the longest entries of this vocabulary
    "東京 🙂 " * 5_000,
]


def test_long_texts_tokenize_as_the_library_does(model_dir: Path) -> None:
    """Long texts go through the library's batch call (it lets go of the GIL): the same ids, with
    and without the special tokens."""
    tok, library = HfTokenizer(model_dir), Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in LONG_TEXTS:
        assert tok.encode(text) == library.encode(text, add_special_tokens=True).ids
    chat = [("user", LONG_TEXTS[0])]
    rendered = tok.render_chat(chat)
    assert tok.apply_chat_template(chat) == library.encode(rendered, add_special_tokens=False).ids


@pytest.mark.parametrize("text", [*TEXTS, *LONG_TEXTS, "x" * 5000, "\n" * 3000])
def test_no_text_has_fewer_tokens_than_max_token_chars_promises(model_dir: Path, text: str) -> None:
    """What lets the scheduler refuse a prompt too long to serve without tokenizing it."""
    for tok in (HfTokenizer(model_dir), ByteTokenizer()):
        assert len(tok.encode(text)) * tok.max_token_chars >= len(text)
