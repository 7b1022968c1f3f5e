"""The per-model ``save_pretrained`` hook that makes a model with ARMOR Linears save as armor-ct.

Why a wrapper around the whole save rather than a state-dict hook: llm-compressor's wrapper rewrites
``config.json`` *after* transformers returns (``resave_config``, then compressed-tensors'
``update_config``), so only code that runs after it can write the armor-ct config. Hence
:func:`install_save_hook` puts an instance-level ``save_pretrained`` *outside* whatever is there and
marks it ``_overridden`` so llm-compressor does not wrap it again. ``ARMORModifier`` installs it
(its ``on_finalize`` runs after ``oneshot`` has wrapped the model) and the armor-ct loader installs
it on every model it loads. Nothing is patched globally: a model whose wrappers were attached by
hand is saved with :func:`armor_modifier.save_armor_pretrained` (or after ``install_save_hook``).
"""

from __future__ import annotations

import os
import types
from typing import Any

from torch import nn

from .save import ARMOR_RECIPE_ATTR, INNER_SAVE_ATTR, save_armor_pretrained

__all__ = ["INNER_SAVE_ATTR", "install_save_hook", "remove_save_hook"]

def save_pretrained(
    self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
) -> None:
    """The hook, bound to one model: :func:`save_armor_pretrained` of that model.

    A bound method (not a closure), so ``copy.deepcopy(model)`` rebinds it to the copy and
    ``torch.save(model)`` can pickle the model.
    """
    return save_armor_pretrained(self, save_directory, *args, **kwargs)


_hook: Any = save_pretrained
_hook._overridden = True  # llm-compressor's marker: do not wrap this save again
_hook._armor_save = True


def appended_recipe(model: nn.Module, mine: dict[str, Any]) -> dict[str, Any]:
    """``armor.recipe`` after one more ARMORModifier: its settings ``mine``, or, when an earlier
    one already recorded its own on the model, ``{"modifiers": [earlier..., mine]}``; a recorded
    ``"distillation"`` stays at the top level."""
    earlier = getattr(model, ARMOR_RECIPE_ATTR, None)
    if not isinstance(earlier, dict):
        return mine
    earlier = dict(earlier)
    distillation = earlier.pop("distillation", None)
    appended = {"modifiers": [*earlier.get("modifiers", [earlier]), mine]}
    return appended if distillation is None else {**appended, "distillation": distillation}


def install_save_hook(model: nn.Module, recipe: dict[str, Any] | None = None) -> None:
    """Make ``model.save_pretrained`` write armor-ct, outside any wrapper already installed.

    Idempotent. Call it after llm-compressor has wrapped ``save_pretrained`` (``ARMORModifier``
    does, and the armor-ct loader does on every loaded model). The hook is marked ``_overridden``
    so llm-compressor does not wrap it again; in that case the compressed-tensors compression its
    wrapper would do is done here (its ``recipe.yaml`` is then not written).

    :param recipe: stored as ``model.armor_recipe`` and written to ``armor.recipe``
    """
    if recipe is not None:
        setattr(model, ARMOR_RECIPE_ATTR, recipe)
    own = model.__dict__.get("save_pretrained")
    if getattr(own, "_armor_save", False):
        return
    model.__dict__[INNER_SAVE_ATTR] = own
    model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)


def remove_save_hook(model: nn.Module) -> None:
    """Undo :func:`install_save_hook` (restoring the wrapper it enclosed, if any)."""
    own: Any = model.__dict__.get("save_pretrained")
    if not getattr(own, "_armor_save", False):
        return
    inner = model.__dict__.pop(INNER_SAVE_ATTR, None)
    if inner is None:
        del model.__dict__["save_pretrained"]
    else:
        model.__dict__["save_pretrained"] = inner
