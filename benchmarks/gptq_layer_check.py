"""Layer-level check of mask-preserving GPTQ on SmolLM2-135M's own Hessians.

For 16 Linears (q_proj, o_proj, gate_proj, down_proj of layers 2, 10, 20, 28) of the dense model,
accumulates the input Hessian on 16 x 512 WikiVital-train tokens (calibration) and on 16 x 512
tokens of WikiVital valid and PTB valid (held out); prunes each weight to 2:4 with SparseGPT on the
calibration Hessian, then quantizes the sparse weight to symmetric int4 in groups of 64 columns:

- ``rtn``: round-to-nearest, grids from the sparse weight (min-max);
- ``gptq-static``: :func:`masked_gptq` with those grids fixed (llm-compressor's ``GPTQModifier``);
- ``gptq-fitted``: grids fitted when GPTQ reaches each group (``ARMORGPTQModifier``'s default);
- ``gptq-fitted-d0.1``: the same with ``dampening_frac`` 0.1;
- ``gptq-act-fitted-d0.1``: the same in activation order;
- ``gptq-fitted-d0.1+refit4`` / ``rtn+refit4``: ``gptq-fitted-d0.1`` / ``rtn``, then 4 passes of
  :func:`~armor_modifier.core.wrapper_refit.refit_wrappers` with identity wrappers of block 32
  (``ARMORGPTQModifier``'s default on ARMOR Linears; here the weights are SparseGPT's, so the
  wrappers start at identity and the refitted layer is ``A' Q B'``).

Prints, per Linear and as a mean over them, the output error that quantization adds on top of the
2:4 weight's own error (``tr((Q - W) H (Q - W)^T) / tr((S - W) H (S - W)^T) - 1``, ``W`` dense,
``S`` sparse, ``Q`` quantized) on the calibration Hessian and on both held-out Hessians.

Usage::

    python benchmarks/gptq_layer_check.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

LAYERS = (2, 10, 20, 28)
PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
GROUP = 64
WRAPPER_BLOCK = 32
WINDOWS, SEQ_LEN = 16, 512


def hessians(model, tokenizer) -> dict[tuple[str, str], torch.Tensor]:
    """``{(module name, "cal" | "wikivital" | "ptb"): H [n, n] float64, X^T X / tokens}``."""
    from armor_harness import calibration_samples, load_text
    from armor_modifier.calibration import tokenize_text

    modules = {f"model.layers.{i}.{p}": model.get_submodule(f"model.layers.{i}.{p}")
               for i in LAYERS for p in PROJECTIONS}
    sums: dict[tuple[str, str], torch.Tensor] = {}
    phase = {"name": ""}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            key = (name, phase["name"])
            sums[key] = sums.get(key, 0) + x.T @ x
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    cal = calibration_samples(tokenizer, load_text("wikivital", "train"), WINDOWS, SEQ_LEN)
    batches = {"cal": torch.tensor(cal["input_ids"])}
    for text in ("wikivital", "ptb"):
        ids = tokenize_text(tokenizer, load_text(text, "valid"))[: WINDOWS * SEQ_LEN]
        batches[text] = ids.reshape(WINDOWS, SEQ_LEN)
    with torch.no_grad():
        for name, batch in batches.items():
            phase["name"] = name
            for window in batch:
                model(window.unsqueeze(0))
    for h in handles:
        h.remove()
    return {key: value / (WINDOWS * SEQ_LEN) for key, value in sums.items()}


def int4_grid(weight: torch.Tensor):
    """``ARMORGPTQModifier``'s grid for symmetric int4 in groups of ``GROUP``: the observer's
    (min-max) scales of ``weight``, refittable group by group."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.observers.min_max import MemorylessMinMaxObserver

    from armor_modifier.modifier.gptq import ColumnGrid

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                            group_size=GROUP)
    observer = MemorylessMinMaxObserver(base_name="weight", args=args.model_copy(deep=True))
    observer(weight)
    qparams = observer.get_qparams()
    return ColumnGrid(qparams["scale"], qparams["zero_point"], args, observer)


def variants(S: torch.Tensor, H: torch.Tensor) -> dict[str, torch.Tensor]:
    from armor_modifier.core import masked_gptq

    order = torch.argsort(H.diagonal(), descending=True)
    out = {"rtn": int4_grid(S)(S, 0) * (S != 0)}
    for name, damp, fitted, act in (("gptq-static", 0.01, False, False),
                                    ("gptq-fitted", 0.01, True, False),
                                    ("gptq-fitted-d0.1", 0.1, True, False),
                                    ("gptq-act-fitted-d0.1", 0.1, True, True)):
        grid = int4_grid(S)
        fit = {"fit_group": grid.fit, "group_size": GROUP} if fitted else {}
        out[name] = masked_gptq(S, H, grid, dampening_frac=damp, order=order if act else None,
                                **fit).weight
    for name in ("gptq-fitted-d0.1", "rtn"):
        out[f"{name}+refit4"] = refitted(S, out[name], H)
    return out


def refitted(S: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``A' Q B'``: identity wrappers of block ``WRAPPER_BLOCK`` refitted to ``Q``, target ``S``."""
    from armor_modifier.core import identity_blocks, left_blockdiag, right_blockdiag
    from armor_modifier.core.wrapper_refit import refit_wrappers

    (m, n), b = S.shape, WRAPPER_BLOCK
    fit = refit_wrappers(identity_blocks(m // b, b), identity_blocks(n // b, b), S, Q, H, 4)
    return right_blockdiag(left_blockdiag(fit.A, Q), fit.B)


def added_error(Q: torch.Tensor, S: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    def energy(E: torch.Tensor) -> float:
        E = E.double()
        return float(torch.einsum("ij,jk,ik->", E, H, E))

    return energy(Q - W) / energy(S - W) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from armor_harness import load_default_model
    from armor_modifier.core.sparsegpt import sparsegpt_2of4

    model, tokenizer, _ = load_default_model()
    model.eval()
    H = hessians(model, tokenizer)
    names = sorted({name for name, _ in H})
    splits = ("cal", "wikivital", "ptb")
    means: dict[tuple[str, str], float] = {}
    print("added error on calibration / WikiVital valid / PTB valid")
    for name in names:
        W = model.get_submodule(name).weight.detach().float()
        S, _ = sparsegpt_2of4(W, H[(name, "cal")].float())
        cells = []
        for variant, Q in variants(S, H[(name, "cal")].float()).items():
            errors = [added_error(Q, S, W, H[(name, split)]) for split in splits]
            for split, e in zip(splits, errors, strict=True):
                means[(variant, split)] = means.get((variant, split), 0.0) + e / len(names)
            cells.append(f"{variant} " + "/".join(f"{e:.3f}" for e in errors))
        print(name.removeprefix("model.layers."), "|", " | ".join(cells), flush=True)
    print("\nmean over the Linears (calibration / WikiVital valid / PTB valid):")
    for variant in dict.fromkeys(v for v, _ in means):
        print(f"  {variant:22s}", " / ".join(f"{means[(variant, s)]:.3f}" for s in splits))


if __name__ == "__main__":
    main()
