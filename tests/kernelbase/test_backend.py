"""The backend choice: one function decides, the environment variable is read once, and every
mistake with it gets an answer that says what to do."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernelbase
from kernelbase.backend import INTERPRETER_ON, Backend, backend_for, get_backend


def test_use_backend_forces_and_restores():
    before = backend_for(torch.device("cpu"))
    with kernelbase.use_backend("torch"):
        assert backend_for(torch.device("cpu")) is Backend.TORCH
        assert get_backend() is Backend.TORCH
    assert backend_for(torch.device("cpu")) is before
    assert get_backend() is None


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"'triton', 'interpreter', 'torch', got 'cuda'"):
        kernelbase.set_backend("cuda")


@pytest.mark.skipif(not INTERPRETER_ON, reason="the suite runs without the interpreter")
def test_compiled_triton_cannot_be_forced_under_the_interpreter():
    with pytest.raises(ValueError, match="every Triton kernel runs under the interpreter"):
        kernelbase.set_backend("triton")
    assert backend_for(torch.device("cpu")) is Backend.INTERPRETER


def test_info_says_what_runs_on_each_device_and_why():
    report = kernelbase.info()
    assert set(report) == {"cpu", "cuda", "moeblaze._C", "overlap._C"}
    assert report["cpu"].split(":")[0] in ("interpreter", "torch")
    with kernelbase.use_backend("torch"):
        assert kernelbase.info()["cpu"] == "forced by set_backend('torch')"


LATE_INTERPRETER = textwrap.dedent(
    """
    import os, warnings
    import torch, moeblaze, overlap
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels are defined
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, 1]] * 5)
    w13, w2 = torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = moeblaze.moe_mlp(x, ids, torch.rand(5, 2), w13, w2)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    assert any("set it before importing" in str(w.message) for w in caught), caught
    try:
        overlap.LocalWorld(2, "cpu", mode="fused")
    except ValueError as e:
        assert "set it before importing" in str(e), e
    else:
        raise AssertionError("LocalWorld(mode='fused') did not raise")
    try:
        moeblaze.set_backend("interpreter")
    except ValueError as e:
        assert "before moeblaze or overlap is first imported" in str(e), e
    else:
        raise AssertionError("set_backend('interpreter') did not raise")
    print("ok")
    """
)


def test_interpreter_switched_on_after_import_gets_a_clear_answer():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
