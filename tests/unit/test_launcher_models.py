"""What `pdorch up` hands its workers and vLLM servers for the model it serves (nothing started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdorch.launcher import ClusterSpec, LocalCluster, model_name
from tests.support.tiny_gguf import write_tiny_gguf
from transport.messages import Role
from workers.models.cache_dir import CACHE_DIR_ENV


@pytest.fixture
def gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf")
    return tmp_path / "tiny.gguf"


def test_the_default_is_the_catalogued_model_by_name() -> None:
    spec = ClusterSpec()
    assert model_name(spec) == "smollm2-135m-instruct"
    assert LocalCluster(ClusterSpec(port=0, log_dir=Path("/tmp"))).model_args() == [
        "--model",
        "smollm2-135m-instruct",
    ]


def test_reference_workers_get_the_converted_file(gguf: Path, tmp_path: Path) -> None:
    cluster = LocalCluster(ClusterSpec(port=0, model=str(gguf), log_dir=tmp_path / "logs"))
    cluster.resolve_model()
    assert Path(cluster.model_dir, "model.safetensors").is_file()
    assert cluster.model_args() == ["--model", "tiny", "--weights", cluster.model_dir]


def test_vllm_servers_serve_the_converted_directory_under_the_models_name(gguf: Path, tmp_path: Path) -> None:
    cluster = LocalCluster(ClusterSpec(port=0, engine="vllm", model=str(gguf), log_dir=tmp_path / "logs"))
    cluster.resolve_model()
    spec = cluster.vllm_spec("decode", 8200, "tcp://127.0.0.1:5601", index=1)
    assert (spec.model_dir, spec.served_model_name, spec.role) == (cluster.model_dir, "tiny", Role.DECODE)
    assert spec.max_model_len == 256  # the model's own context, under the launcher's 2048
    assert spec.cpu_cores == "1"
