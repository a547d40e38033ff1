"""The overlap kernels compile for H100 (sm_90), checked without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_overlap_kernels_compile_for_sm90_with_flag_atomics():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_compile_overlap.py"))],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = {
        r["kernel"]: r
        for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    }
    assert set(reports) == {"ag_gemm_kernel", "gemm_rs_kernel", "rs_reduce_kernel",
                            "raise_flag_kernel"}, proc.stdout  # fmt: skip
    for name in ("ag_gemm_kernel", "gemm_rs_kernel"):
        # Hopper tensor cores with software-pipelined async copies inside the persistent loop.
        assert reports[name]["wgmma"] >= 1, reports[name]
        assert reports[name]["async_copies"] >= 1, reports[name]
    # The consumers poll with acquire loads; the producers publish with release atomics.
    assert reports["ag_gemm_kernel"]["acquire_loads"] >= 1
    assert reports["rs_reduce_kernel"]["acquire_loads"] >= 1
    assert reports["gemm_rs_kernel"]["release_atomics"] >= 2  # counter (acq_rel) + flag
    assert reports["raise_flag_kernel"]["release_atomics"] >= 1
