"""Which model a reference worker serves: the seeded random-weight model, or real weights.

``--model`` names it: ``pdorch-reference`` is the random-weight model (byte-level tokenizer, no
download), a catalogued name (``smollm2-135m-instruct``) is a real model fetched beforehand with
``make model``. ``--weights`` serves any Llama GGUF file or Hugging Face Llama directory under the
``--model`` name instead. Real models come with their own tokenizer: the converted directory, which
the agent ships to the scheduler.
"""

from __future__ import annotations

from typing import NamedTuple

from workers.engines.reference.checkpoint import load_checkpoint
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.weights import ModelWeights
from workers.models.catalog import RANDOM_MODEL
from workers.models.local_model import model_dir

BYTE_TOKENIZER = "byte"


class ChosenModel(NamedTuple):
    config: ModelConfig
    weights: ModelWeights | None  # None: the seeded random weights the config describes
    tokenizer: str  # "byte", or the model directory holding tokenizer.json


def choose_model(
    name: str, weights: str = "", *, dtype: str = "float64", seed: int = 0, max_model_len: int = 0
) -> ChosenModel:
    if not weights and name == RANDOM_MODEL:
        context = {"max_model_len": max_model_len} if max_model_len > 0 else {}
        return ChosenModel(ModelConfig(seed=seed, dtype=dtype, **context), None, BYTE_TOKENIZER)
    directory = model_dir(weights or name)
    cfg, loaded = load_checkpoint(directory, dtype=dtype, max_model_len=max_model_len)
    return ChosenModel(cfg, loaded, str(directory))
