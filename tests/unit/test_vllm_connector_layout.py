"""What the KV connector refuses at startup: layouts other than tensor parallelism on one host, and
KV caches outside host memory (it would otherwise fail every handoff later, or send part of the KV)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.vllm_support.environment import REPO_ROOT, vllm_python
from transport.errors import ErrorCode, PdorchError
from workers.engines.vllm.connector_worker import as_numpy, check_layout


def test_tensor_parallelism_on_one_host_is_the_layout_it_moves() -> None:
    check_layout()  # whatever the tensor-parallel size
    for other in ({"pipeline": 2}, {"context": 2}, {"data": 2}, {"nodes": 2}, {"pipeline": 2, "data": 2}):
        with pytest.raises(PdorchError) as e:
            check_layout(**other)
        assert e.value.code is ErrorCode.CONFIG and "tensor parallelism alone" in e.value.message


def test_numpy_caches_are_taken_as_they_are() -> None:
    cache = np.zeros((4, 2, 32, 8), np.float32)
    assert as_numpy(cache) is cache


def test_a_torch_cache_outside_host_memory_is_refused() -> None:
    """With torch's "meta" device, which every build has (no GPU here): a CPU tensor becomes a view,
    any other device is refused by name."""
    code = (
        "import torch\n"
        "from transport.errors import PdorchError\n"
        "from workers.engines.vllm.connector_worker import as_numpy\n"
        "view = as_numpy(torch.ones(2, 3, dtype=torch.bfloat16))\n"
        "assert view.shape == (2, 3) and view.dtype.itemsize == 2\n"
        "try:\n"
        "    as_numpy(torch.empty(2, 3, device='meta'))\n"
        "except PdorchError as e:\n"
        "    print(e.code, e.message)\n"
    )
    done = subprocess.run(
        [str(vllm_python()), "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("config ") and "host memory" in done.stdout and "meta" in done.stdout
