"""CUDA 2:4 runtime: run every ARMOR core as a semi-structured sparse tensor.

:func:`to_semi_structured` replaces the ``weight [m, n]`` of each ARMOR Linear by
``torch.sparse.to_sparse_semi_structured``'s compressed form, so ``F.linear`` dispatches to the
2:4 tensor-core kernels (cuSPARSELt, or CUTLASS); the wrapper hooks keep applying ``B`` before and
``A`` after as batched ``b x b`` block products, ``y = A (S (B x)) + bias``.

- fp16 / bf16 cores: either backend (CUTLASS on compute capability 8.x only: PyTorch's CUTLASS
  2:4 matmul fails on Hopper, seen on an H200). Shapes must be multiples of the backend's
  minimum tile (cuSPARSELt 16x16, CUTLASS 32x64 for 16-bit cores).
- 8-bit compressed-tensors cores (FP8_DYNAMIC, W8A8 INT8: per-channel static weights, per-token
  dynamic activations): cuSPARSELt ``_cslt_sparse_mm`` on the 8-bit codes, with the activation
  codes computed by compressed-tensors' own ``compute_dynamic_scales_and_zp`` and its eager
  quantization formula (:func:`_activation_codes`), and both scales applied to the bf16 result.
  Used only when a probe matmul succeeds on the device (FP8 needs sm89+ and a cuSPARSELt build
  with E4M3).

Needs CUDA with compute capability >= 8.0; raises :class:`ARMORRuntimeError` otherwise. The GPU
tests (``tests/test_cuda.py``, marker ``gpu``) hold the accuracy bounds.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from .core.errors import ARMORRuntimeError
from .core.sparsity import count_broken_groups
from .runtime import armor_linears

__all__ = [
    "ARMORRuntimeError",
    "semi_structured_problem",
    "to_semi_structured",
    "to_dense",
    "scaled_8bit_supported",
]

Backend = Literal["cusparselt", "cutlass"]
_CLASSES = {
    "cusparselt": SparseSemiStructuredTensorCUSPARSELT,
    "cutlass": SparseSemiStructuredTensorCUTLASS,
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
_PACKED = "_armor_packed"
_FORWARD = "_armor_dense_forward"


def capability_problem(capability: tuple[int, int], device_name: str) -> str | None:
    """Why a GPU of ``capability`` cannot run 2:4 kernels, or ``None`` when it can (sm80+)."""
    if capability < (8, 0):
        return (
            f"{device_name} has compute capability {capability[0]}.{capability[1]}; 2:4 "
            "semi-structured kernels need 8.0 or newer (A100, H100/H200, RTX 30xx/40xx, L4/L40)"
        )
    return None


def semi_structured_problem(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 kernels cannot run on ``device`` (default: the current CUDA device), or ``None``."""
    if not torch.cuda.is_available():
        return (
            "CUDA is not available (torch.cuda.is_available() is False); the 2:4 runtime needs an "
            "NVIDIA GPU with compute capability >= 8.0. On CPU the ARMOR hooks run the dense core."
        )
    device = torch.device("cuda") if device is None else torch.device(device)
    return capability_problem(
        torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    )


@functools.lru_cache(maxsize=None)
def scaled_8bit_supported(dtype: torch.dtype, device_index: int) -> bool:
    """Whether cuSPARSELt runs a ``dtype`` (``float8_e4m3fn`` or ``int8``) 2:4 matmul with bf16
    output on ``cuda:device_index`` (probed once with a 32x32 product)."""
    device = torch.device("cuda", device_index)
    if dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=device).repeat(32, 8)
    weight = torch.ones(32, 32, device=device).masked_fill(~mask, 0).to(dtype)
    try:
        packed = torch._cslt_compress(weight)
        x = torch.ones(32, 32, device=device).to(dtype)
        torch._cslt_sparse_mm(packed, x.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _check_shape(name: str, weight: torch.Tensor, backend: Backend) -> None:
    limits = _CLASSES[backend]._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        raise ARMORRuntimeError(
            f"{name}: the {backend} 2:4 backend has no kernel for {weight.dtype} cores"
        )
    m, n = weight.shape
    if m % limits.sparse_min_rows or n % limits.sparse_min_cols:
        raise ARMORRuntimeError(
            f"{name}: core {m}x{n} is not a multiple of the {backend} {weight.dtype} tile "
            f"({limits.sparse_min_rows}x{limits.sparse_min_cols}); leave this module out of "
            "ARMOR or pick the other backend"
        )


def _activation_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: Any, args: Any):
    """compressed-tensors' eager ``_quantize`` (``x / scale + zp``, clamp, round or cast to the
    8-bit dtype). Its public ``quantize`` dispatches CUDA tensors to a Triton kernel that, in
    0.19, raises "Unsupported quantization strategy: token" (found on an H200)."""
    from compressed_tensors.quantization.quant_args import round_to_quantized_type_args
    from compressed_tensors.quantization.utils import calculate_range

    q_min, q_max = calculate_range(args, x.device)
    scaled = x / scale
    if zero_point is not None:
        scaled += zero_point.to(x.dtype)
    codes = round_to_quantized_type_args(tensor=scaled, args=args, min=q_min, max=q_max)
    return codes.to(args.pytorch_dtype())


def _scaled_8bit_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x`` (already ``B x``) -> ``S x + bias`` with 8-bit codes on cuSPARSELt."""
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    scheme: Any = self.quantization_scheme
    args = scheme.input_activations
    scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=self)
    codes = _activation_codes(x, scale, zero_point, args)
    n = x.shape[-1]
    codes = codes.reshape(-1, n)
    tokens = codes.shape[0]
    pad = (-tokens) % 16
    if pad:
        codes = F.pad(codes.view(torch.uint8), (0, 0, 0, pad)).view(codes.dtype)
    acc = torch._cslt_sparse_mm(getattr(self, _PACKED), codes.t(), out_dtype=torch.bfloat16)
    x_scale = scale.float().expand(*x.shape[:-1], 1).reshape(-1, 1)
    weight_scale: Any = self.weight_scale
    out = acc[:, :tokens].t().float() * x_scale * weight_scale.float().reshape(1, -1)
    out = out.to(x.dtype)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], -1)


def _convert_8bit(name: str, linear: nn.Linear) -> str:
    from compressed_tensors.quantization.lifecycle.forward import quantize

    scheme: Any = linear.quantization_scheme
    w_args, x_args = scheme.weights, scheme.input_activations
    ok = (
        w_args is not None
        and w_args.num_bits == 8
        and w_args.symmetric
        and w_args.strategy == "channel"
        and not w_args.dynamic
        and x_args is not None
        and x_args.num_bits == 8
        and x_args.symmetric
        and x_args.dynamic is True
        and x_args.strategy in ("token", "tensor")
        and scheme.output_activations is None
    )
    if not ok:
        raise ARMORRuntimeError(
            f"{name}: the 2:4 runtime runs quantized cores with 8-bit per-channel weights and "
            f"dynamic per-token 8-bit activations (FP8_DYNAMIC, W8A8); this module's scheme is "
            f"{scheme}"
        )
    dtype = w_args.pytorch_dtype()
    device = linear.weight.device
    if not scaled_8bit_supported(dtype, device.index if device.index is not None else 0):
        raise ARMORRuntimeError(
            f"{name}: cuSPARSELt on {torch.cuda.get_device_name(device)} does not run {dtype} 2:4 "
            "matmuls (FP8 needs compute capability >= 8.9 and a cuSPARSELt with E4M3); load the "
            "model unquantized, or run without to_semi_structured"
        )
    weight = linear.weight.detach()
    if weight.dtype != dtype:
        zero = getattr(linear, "weight_zero_point", None)
        weight = quantize(weight, linear.weight_scale, zero, w_args, dtype=dtype)
    _check_shape(name, weight, "cusparselt")
    setattr(linear, _PACKED, torch._cslt_compress(weight.contiguous()))
    linear.__dict__[_FORWARD] = linear.__dict__.get("forward")
    linear.__dict__["forward"] = _scaled_8bit_forward.__get__(linear)
    return f"cusparselt-{str(dtype).removeprefix('torch.')}"


def to_semi_structured(model: nn.Module, backend: Backend | None = None) -> dict[str, str]:
    """Run every ARMOR core of ``model`` on 2:4 sparse tensor cores, in place.

    Call after ``model.to("cuda")`` (and after loading in fp16/bf16). Undo with :func:`to_dense`
    (saving needs dense cores).

    :param backend: ``"cusparselt"`` (default when available) or ``"cutlass"``; 8-bit cores
        always use cuSPARSELt
    :return: ``{module name: backend used}``
    :raises ARMORRuntimeError: without CUDA sm80+, or naming the module whose dtype, shape,
        quantization scheme or sparsity the kernels cannot take (nothing is converted then)
    """
    linears = armor_linears(model)
    if not linears:
        raise ARMORRuntimeError("the model has no ARMOR Linears (nothing to convert)")
    if backend is None:
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    if backend not in _CLASSES:
        raise ARMORRuntimeError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    for name, linear in linears.items():
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ARMORRuntimeError(
                f"{name}: the core is bit-packed by compressed-tensors (e.g. W4A16); the 2:4 "
                "runtime runs fp16/bf16 and 8-bit (FP8_DYNAMIC, W8A8) cores"
            )
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor) or hasattr(linear, _PACKED):
            raise ARMORRuntimeError(f"{name}: already converted; call to_dense(model) first")
        if weight.device.type != "cuda":
            raise ARMORRuntimeError(
                f"{name}: the core is on {weight.device}; move the model to a CUDA device first "
                f"({semi_structured_problem() or 'model.to(device)'})"
            )
        problem = semi_structured_problem(weight.device)
        if problem:
            raise ARMORRuntimeError(f"{name}: {problem}")
        if count_broken_groups(weight.detach().float()):
            raise ARMORRuntimeError(f"{name}: the core is not 2:4; the kernels would change it")
        if hasattr(linear, "quantization_scheme"):
            continue
        if weight.dtype not in _FLOAT_DTYPES:
            raise ARMORRuntimeError(
                f"{name}: core dtype {weight.dtype}; the 2:4 kernels take float16/bfloat16 "
                "(load with dtype=torch.bfloat16)"
            )
        _check_shape(name, weight, backend)
        if backend == "cutlass" and torch.cuda.get_device_capability(weight.device)[0] != 8:
            raise ARMORRuntimeError(
                f"{name}: PyTorch's cutlass 2:4 kernels run on compute capability 8.x only "
                f"({torch.cuda.get_device_name(weight.device)} is "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(weight.device)))}: the "
                "matmul fails with 'sparse_semi_structured_mad_op'); use backend='cusparselt'"
            )
        if linear.bias is not None and linear.bias.dtype != weight.dtype:
            raise ARMORRuntimeError(
                f"{name}: bias dtype {linear.bias.dtype} != core {weight.dtype}"
            )
    report = {}
    for name, linear in linears.items():
        if hasattr(linear, "quantization_scheme"):
            report[name] = _convert_8bit(name, linear)
            continue
        sparse = _CLASSES[backend].from_dense(linear.weight.detach())
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        report[name] = backend
    return report


def to_dense(model: nn.Module) -> int:
    """Undo :func:`to_semi_structured`: dense cores back in ``weight``. Returns modules restored."""
    restored = 0
    for linear in armor_linears(model).values():
        weight = linear.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            linear.weight = nn.Parameter(weight.to_dense(), requires_grad=False)
            restored += 1
        elif hasattr(linear, _PACKED):
            delattr(linear, _PACKED)
            forward = linear.__dict__.pop(_FORWARD)
            if forward is None:
                del linear.__dict__["forward"]
            else:
                linear.__dict__["forward"] = forward
            restored += 1
    return restored
