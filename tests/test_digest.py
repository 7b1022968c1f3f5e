"""The progress files' input digest (``modifier/digest.py``) against a pure-Python reference."""

from __future__ import annotations

import pytest
import torch

from armor_modifier.modifier.digest import InputDigest, batch_checksum

P = 2**31 - 1
WEIGHTS = ((48271, 12345), (69621, 54321))
VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
         torch.float64: torch.int64}  # fmt: skip


def reference(x: torch.Tensor) -> tuple[int, int]:
    """The definition, in Python integers: sum_i (bits_i * ((a i + c) mod (P - 1) + 1)) mod P
    (mod P - 1, not mod P: with (a i + c) mod P + 1 the weight is P, i.e. 0 mod P, at
    i = 1,803,946,767 for the first pair, and that element would not count)."""
    bits = x.contiguous().reshape(-1).view(VIEWS[x.dtype]).tolist()
    return tuple(
        sum(b % P * ((a * i + c) % (P - 1) + 1) for i, b in enumerate(bits)) % P for a, c in WEIGHTS
    )  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", list(VIEWS))
def test_checksum_matches_the_python_reference(dtype):
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0] = -x[0, 0, 0]  # negative bit patterns too
    assert batch_checksum(x) == reference(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_single_element_change_changes_both_checksums(dtype):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    base = batch_checksum(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        y = flat.clone()
        y.view(VIEWS[dtype])[i] ^= 1  # the last mantissa bit
        first, second = batch_checksum(y)
        assert first != base[0] and second != base[1], i


def test_checksum_does_not_depend_on_the_thread_count_or_the_layout():
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batch_checksum(x)
        torch.set_num_threads(2)
        two = batch_checksum(x)
    finally:
        torch.set_num_threads(threads)
    assert one == two == batch_checksum(x.T.contiguous().T)


def test_the_digest_sees_content_dtype_and_shape_but_not_order():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)

    def digest(*tensors):
        running = InputDigest()
        for t in tensors:
            running.add(t)
        return running.hexdigest()

    assert digest(a, b) == digest(b, a)  # llm-compressor shuffles batches by default
    assert len({digest(a, b), digest(a, a), digest(a), digest(a.reshape(3, 2), b),
                digest(a.to(torch.float64), b)}) == 5  # fmt: skip



def test_the_digest_keeps_weights_per_batch_size_and_matches_the_reference():
    """InputDigest reuses one size's position weights across batches; batches of another size
    in between must not reuse them."""
    import hashlib

    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g),
               torch.randn(3, 7, generator=g), torch.randn(4, 5, generator=g)]  # fmt: skip
    running = InputDigest()
    for x in batches:
        running.add(x)
    records = sorted(f"{x.dtype}{tuple(x.shape)}:{c1}:{c2};"
                     for x in batches for c1, c2 in [reference(x)])  # fmt: skip
    assert running.hexdigest() == hashlib.sha256("".join(records).encode()).hexdigest()
