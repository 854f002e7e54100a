"""A Llama GGUF file converted once into a Hugging Face model directory.

The directory is what both engines read: vLLM serves it as any Hugging Face checkpoint, and the
reference engine loads the same ``model.safetensors`` (float32, dequantized), so the two compute
with identical weights. It holds ``config.json``, ``generation_config.json``, ``model.safetensors``
and the tokenizer files (``gguf_tokenizer.py``).

Export is atomic: files are written into a fresh sibling directory that is renamed into place at
the end, so a directory that exists is complete (an interrupted export leaves only a temporary
directory behind, removed on the next attempt's success or by deleting the cache).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transport.errors import ErrorCode, PdorchError
from workers.models.gguf_llama import GgufLlama, LlamaHyperparams

log = logging.getLogger(__name__)

# Bumped when the exported layout changes, so older exports are rebuilt rather than misread.
EXPORT_FORMAT = 1
_MARKER = "pdorch-export.json"


def hf_config(hp: LlamaHyperparams) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.ffn,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context_length,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": hp.tied_embeddings,
        "bos_token_id": hp.bos_token_id,
        "eos_token_id": hp.eos_token_id,
        "torch_dtype": "float32",
    }


def is_exported(out: Path, source_sha256: str) -> bool:
    try:
        marker = json.loads((out / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"format": EXPORT_FORMAT, "source_sha256": source_sha256}


def export_hf(gguf_path: Path, out: Path, source_sha256: str) -> Path:
    """Convert ``gguf_path`` into the Hugging Face directory ``out`` (replacing an outdated one)."""
    # Only converting needs these (and the tokenizers library is slow to import).
    from safetensors.numpy import save_file

    from workers.models.gguf_tokenizer import write_tokenizer_files

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out
        gguf = GgufLlama(gguf_path)
        hp = gguf.hyperparams
        log.info("converting %s into %s (once)", gguf_path.name, out)
        (staging / "config.json").write_text(json.dumps(hf_config(hp), indent=2) + "\n")
        generation = {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(gguf, staging)
        weights = staging / "model.safetensors"
        save_file(dict(gguf.tensors()), str(weights), metadata={"format": "pt"})
        weights.chmod(0o644)
        marker = {"format": EXPORT_FORMAT, "source_sha256": source_sha256}
        (staging / _MARKER).write_text(json.dumps(marker) + "\n")
        if out.exists():
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:
            # Another process finished the same export first: keep theirs if it is complete.
            if not is_exported(out, source_sha256):
                raise
    except OSError as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot write the converted model to {out}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
    return out
