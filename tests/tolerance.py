"""The one tolerance helper of the test suite: relative Frobenius-norm error, in float64.

- `rel_err(actual, expected)`: ||actual - expected|| / ||expected||.
- `assert_close(actual, expected, rtol=, name=)`: rel_err <= rtol, and no NaN in `actual`.
  Launchers poison their outputs with NaN before a kernel writes them (`kernelbase.alloc.poison`),
  so a NaN means an element no kernel wrote; the message names its first index.
- `assert_bf16_close(actual, expected_fp64, torch_bf16, factor=, name=)`: the error of `actual`
  against the float64 oracle is at most `factor` times the error of plain PyTorch run in bf16.
"""

import torch

# Below this, plain PyTorch in bf16 counts as "exact" (e.g. an all-zero gradient). The bound on
# the kernel then becomes factor * BF16_FLOOR, far below bf16 resolution (2**-8 = 3.9e-3).
BF16_FLOOR = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius-norm error in float64; 0 for two empty tensors.

    Against an all-zero `expected` it is 0 when `actual` is all zero too, and inf otherwise.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(
            f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
        )
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    diff = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def _first_index(mask: torch.Tensor) -> tuple[int, ...] | None:
    hits = mask.nonzero()
    return tuple(hits[0].tolist()) if len(hits) else None


def _check_finite(actual: torch.Tensor, name: str) -> None:
    a = actual.detach()
    nan = _first_index(torch.isnan(a))
    if nan is not None:
        count = int(torch.isnan(a).sum())
        raise AssertionError(
            f"{name}: NaN at index {nan} ({count} of {a.numel()} elements). Outputs are "
            f"poisoned with NaN before kernels write them: this element was never written."
        )


def _mismatch_report(actual, expected, rtol):
    """First index whose error exceeds rtol * rms(expected), else the largest error."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    err = (a - e).abs()
    rms = torch.linalg.vector_norm(e).item() / max(e.numel(), 1) ** 0.5
    index = _first_index(err > rtol * rms)
    what = "first index with |actual - expected| > rtol * rms(expected)"
    if index is None:
        index = tuple(torch.unravel_index(err.argmax(), err.shape))
        index = tuple(int(i) for i in index)
        what = "largest |actual - expected|"
    return f"{what}: {index}: actual {a[index].item()!r}, expected {e[index].item()!r}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, name: str) -> None:
    """Fail unless rel_err(actual, expected) <= rtol and `actual` holds no NaN."""
    _check_finite(actual, name)
    err = rel_err(actual, expected)
    if not err <= rtol:
        raise AssertionError(
            f"{name}: relative error {err:.3e} > rtol {rtol:.1e} "
            f"(shape {tuple(actual.shape)}); {_mismatch_report(actual, expected, rtol)}"
        )


def assert_bf16_close(
    actual: torch.Tensor,
    expected_fp64: torch.Tensor,
    torch_bf16: torch.Tensor,
    *,
    factor: float,
    name: str,
) -> None:
    """Fail unless rel_err(actual, oracle) <= factor * max(rel_err(torch_bf16, oracle), floor).

    `expected_fp64` is the float64 oracle; `torch_bf16` is the same computation in plain PyTorch
    with bfloat16 tensors, the yardstick for what bf16 rounding costs at this shape.
    """
    _check_finite(actual, name)
    err = rel_err(actual, expected_fp64)
    base = rel_err(torch_bf16, expected_fp64)
    bound = factor * max(base, BF16_FLOOR)
    if not err <= bound:
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {factor} x {max(base, BF16_FLOOR):.3e} (plain "
            f"PyTorch bf16) = {bound:.3e} (shape {tuple(actual.shape)}); "
            f"{_mismatch_report(actual, expected_fp64, bound)}"
        )
