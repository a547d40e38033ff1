"""Helpers shared by the overlap tests: the tolerance check and random inputs (never zeros)."""

import torch

# Relative norm error allowed against a float64 reference, per kernel dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """Relative norm error <= rtol; on failure name the first element that is far off or NaN."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    if err <= rtol:
        return
    diff = (actual.double() - expected.double()).abs()
    bad = torch.isnan(diff) | (diff > rtol * expected.double().abs().max())
    index = tuple(torch.nonzero(bad)[0].tolist()) if bad.any() else None
    where = f"; first mismatch at {index}: {actual[index].item()} vs {expected[index].item()}"
    raise AssertionError(f"{name}: relative error {err:.3g} > {rtol:g}" + (where if index else ""))


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
