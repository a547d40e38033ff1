"""Tests of the suite's tolerance helper (tests/tolerance.py)."""

import pytest
import torch
from tolerance import assert_bf16_close, assert_close, rel_err


def test_rel_err():
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert rel_err(torch.tensor([3.0, 4.5]), expected) == pytest.approx(0.1)
    assert rel_err(torch.empty(0, 3), torch.empty(0, 3)) == 0.0
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_err(torch.ones(2), torch.zeros(2)) == float("inf")
    with pytest.raises(AssertionError, match="shape mismatch"):
        rel_err(torch.ones(2), torch.ones(3))


def test_assert_close_reports_error_bound_index_and_values():
    expected = torch.arange(1.0, 7.0).view(2, 3)
    actual = expected.clone()
    actual[1, 1] += 1.0
    assert_close(expected, expected.double(), rtol=0, name="same")
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, rtol=1e-3, name="y")
    message = str(info.value)
    assert message.startswith("y: relative error 1.048e-01 > rtol 1.0e-03")
    assert "(1, 1): actual 6.0, expected 5.0" in message


def test_assert_close_fails_on_nan_with_its_first_index():
    actual = torch.ones(2, 3)
    actual[1, 2] = float("nan")
    with pytest.raises(AssertionError, match=r"dx: NaN at index \(1, 2\) \(1 of 6 elements\)"):
        assert_close(actual, torch.ones(2, 3), rtol=1.0, name="dx")


def test_assert_bf16_close_scales_the_plain_torch_error():
    expected = torch.linspace(1, 2, 100, dtype=torch.float64)
    baseline = expected * (1 + 1e-3)  # plain PyTorch: relative error 1e-3
    assert_bf16_close(expected * (1 + 1.9e-3), expected, baseline, factor=2, name="ok")
    with pytest.raises(AssertionError, match=r"w: relative error 2\.100e-03 > 2 x 1\.000e-03"):
        assert_bf16_close(expected * (1 + 2.1e-3), expected, baseline, factor=2, name="w")
    # When plain PyTorch is exact, the floor still allows tiny differences, no more.
    assert_bf16_close(expected * (1 + 1e-6), expected, expected, factor=2, name="floor")
    with pytest.raises(AssertionError):
        assert_bf16_close(expected * (1 + 1e-3), expected, expected, factor=2, name="floor")
