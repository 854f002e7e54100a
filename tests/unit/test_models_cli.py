"""`pdorch model`: list the known models, and print (converting once) the directory an engine loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdorch.cli import main
from tests.support.tiny_gguf import write_tiny_gguf
from workers.models.cache_dir import CACHE_DIR_ENV
from workers.models.local_model import model_dir, served_name


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_list_says_what_is_downloaded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "list"]) == 0
    assert "smollm2-135m-instruct  (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0; not downloaded)" in (
        capsys.readouterr().out
    )


def test_path_converts_a_gguf_file_once(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    assert main(["model", "path", str(gguf)]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.parent.parent == cache / "models" / "gguf" and (out / "model.safetensors").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert model_dir(str(gguf)) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert served_name(str(gguf)) == "tiny"


def test_a_catalogued_model_that_is_not_downloaded_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["model", "path", "smollm2-135m-instruct"]) == 1
    assert "run `make model`" in capsys.readouterr().err


def test_nonsense_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "path", "no-such-model"]) == 1
    assert "neither a known model" in capsys.readouterr().err


def test_fetch_makes_any_model_ready_and_the_random_one_needs_nothing(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["model", "fetch", "pdorch-reference", str(tmp_path / "tiny.gguf")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "pdorch-reference: seeded random weights, nothing to fetch"
    assert out[1].endswith("/hf") and str(cache) in out[1]
