"""Block units of decoder-layer reconstruction (``reconstruction_unit="block"``; docs/algorithm.md,
"Decoder-layer reconstruction").

A decoder layer's targets lie in a few direct children of the layer (Llama, Qwen2, Gemma-3:
``self_attn`` and ``mlp``). As block units they are fitted one after the other in the order the
forward calls them: every block but the last to the dense block's output on the same layer
input, the last to the layer's output (its ARMOR parameters alone moving, the earlier blocks
already refined). The helpers here find the blocks and read a block's output out of a replay of
the whole layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .capture import first_tensor

__all__ = ["Block", "block_output", "blocks_of", "recording_outputs"]


@dataclass(frozen=True)
class Block:
    """One unit: the layer's child ``name`` (``module``) and the target Linears inside it."""

    name: str
    module: nn.Module
    linears: tuple[nn.Linear, ...]


def blocks_of(
    layer: nn.Module, modules: list[nn.Linear], call_order: list[tuple[nn.Linear, torch.Tensor]]
) -> list[Block]:
    """The layer's children holding ``modules``, ordered by the first call of one of their
    Linears in ``call_order`` (children never called go last, in module order). A target that
    is the layer's direct child is a block of its own."""
    child_of: dict[nn.Linear, str] = {}
    children = dict(layer.named_children())
    for child_name, child in children.items():
        for module in child.modules():
            if isinstance(module, nn.Linear):
                child_of[module] = child_name
    wanted = [m for m in modules if m in child_of]
    first_call: dict[str, int] = {}
    for index, (module, _) in enumerate(call_order):
        if module in child_of and module in wanted:
            first_call.setdefault(child_of[module], index)
    order = list(children)
    names = sorted(
        {child_of[m] for m in wanted},
        key=lambda n: (first_call.get(n, len(call_order)), order.index(n)),
    )
    return [
        Block(name, children[name], tuple(m for m in wanted if child_of[m] == name))
        for name in names
    ]


class _BlockDone(Exception):
    """Raised by a hook to end a replay once the block's output is in."""


def block_output(run_layer: Callable[[], object], block: nn.Module) -> torch.Tensor:
    """``block``'s output (its first tensor) in a run of the layer, which stops right after it
    (with autograd, when enabled)."""
    found: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        found.append(first_tensor(output))
        raise _BlockDone

    handle = block.register_forward_hook(hook)
    try:
        run_layer()
    except _BlockDone:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"{type(block).__name__} was not called by its decoder layer")
    return found[0]


@contextmanager
def recording_outputs(blocks: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Per block, the list its outputs are appended to (detached) while inside."""
    recorded: list[list[torch.Tensor]] = [[] for _ in blocks]

    def recorder(k: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            recorded[k].append(first_tensor(output).detach())

        return hook

    handles = [block.register_forward_hook(recorder(k)) for k, block in enumerate(blocks)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
