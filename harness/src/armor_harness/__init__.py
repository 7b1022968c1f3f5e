"""The benchmark harness of armor-modifier: SmolLM2-135M, the WikiVital / PTB texts, perplexity
and zero-shot accuracy (``zeroshot``). A separate package, so that the library depends on no
model or text package; the library's model and text loading are re-exported for benchmarks."""

from armor_harness.perplexity import PerplexityResult, perplexity
from armor_harness.smollm2 import load_default_model, smollm2_gguf_path
from armor_harness.texts import ptb_split, wikivital_split, wikivital_titles
from armor_modifier.calibration import (
    LoadedModel,
    calibration_samples,
    load_model,
    load_text,
    tokenize_text,
)

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
    "tokenize_text",
    "wikivital_split",
    "wikivital_titles",
]
