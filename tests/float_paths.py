"""Tolerances for "the same maths computed two ways" (a padded vs a trimmed context, compiled vs eager blocks,
another optimizer kernel, another batch size), derived from the float path instead of tuned on one machine.

Two paths that compute the same function differ only by rounding, and which kernel runs (the CPU type, MKL /
oneDNN / OpenBLAS dispatch, OPENBLAS_CORETYPE, the thread count) decides the order in which terms are summed.
A sum of n terms is off from the exact value by about eps·sqrt(n)·(the terms' magnitude) (rounding errors add
like a random walk; n·eps is the worst case). So a claim of exactness is tested twice:

- `assert_close_for(got, want, n)` with float64 tensors, where eps = 2.2e-16: this proves the maths is the same
  (a real difference, e.g. a mask that lets a padded token through, is many orders of magnitude above it);
- the same call with float32 tensors: atol = K·eps·sqrt(n)·max|want| (a value's error scales with the
  magnitude of the tensor it is summed from, not with its own, which may be a near-cancellation at 0) and
  rtol = K·eps·sqrt(n), so it passes on every CPU and thread count and still fails on a real difference.

Comparisons of bit-identical computations (a resume, a reload, a recomputation) stay exact: not here.
"""

from __future__ import annotations

import math

import torch

K = 8.0
"""Headroom over the random-walk estimate (measured errors were 1-2 eps·sqrt(n)·max|want| on the CI CPU)."""


def tolerance(want: torch.Tensor, n: int, scale: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for a value summed from about n terms of magnitude up to `scale` (default max|want|), at
    want's dtype."""
    rtol = K * torch.finfo(want.dtype).eps * math.sqrt(max(n, 1))
    scale = float(want.detach().abs().max()) if scale is None else float(scale)
    return rtol, rtol * max(scale, torch.finfo(want.dtype).tiny)


def sum_length(net: torch.nn.Module, x: torch.Tensor | None = None) -> int:
    """An estimate of the longest sum in `net`: the largest fan-in of a weight (a forward pass); with images
    `x` (B, C, H, W), of a forward + backward pass: a weight's gradient also sums over batch × positions."""
    fan_in = max(p[0].numel() for p in net.parameters() if p.ndim >= 2)
    return fan_in if x is None else x.shape[0] * x.shape[-2] * x.shape[-1] * fan_in


def largest(tensors) -> float:
    """max|x| over several tensors: the scale for values that are 0 in theory, e.g. a gradient that cancels
    exactly (a key bias under softmax) and is pure rounding of the terms of the other gradients' size."""
    return max(float(t.detach().abs().max()) for t in tensors)


def assert_close_for(got: torch.Tensor, want: torch.Tensor, n: int, what: str = "", scale: float | None = None) -> None:
    """got == want up to the rounding of a length-n sum at their dtype (see the module docstring)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    rtol, atol = tolerance(want, n, scale)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}\n(tolerance from the float path: {want.dtype}, n={n}, "
                                             f"rtol={rtol:.2e}, atol={atol:.2e})")
