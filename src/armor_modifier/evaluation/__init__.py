"""Evaluation: text sources, calibration windows, model loading and perplexity."""

from armor_modifier.evaluation.data import (
    calibration_samples,
    load_text,
    ptb_split,
    wikivital_split,
    wikivital_titles,
)
from armor_modifier.evaluation.models import (
    LoadedModel,
    load_default_model,
    load_model,
    smollm2_gguf_path,
)
from armor_modifier.evaluation.perplexity import PerplexityResult, perplexity

__all__ = [
    "LoadedModel",
    "PerplexityResult",
    "calibration_samples",
    "load_default_model",
    "load_model",
    "load_text",
    "perplexity",
    "ptb_split",
    "smollm2_gguf_path",
    "wikivital_split",
    "wikivital_titles",
]
