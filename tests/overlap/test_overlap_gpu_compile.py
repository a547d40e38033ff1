"""The overlap kernels compile for H100 (sm_90), checked without a GPU."""

import pytest
from gpu_compile_testing import compile_reports


@pytest.mark.slow
def test_overlap_kernels_compile_for_sm90_with_flag_atomics():
    reports = {r["kernel"]: r for r in compile_reports("overlap")}
    assert set(reports) == {"ag_gemm_kernel", "gemm_rs_kernel", "rs_reduce_kernel",
                            "raise_flag_kernel"}, reports  # fmt: skip
    for name in ("ag_gemm_kernel", "gemm_rs_kernel"):
        # Hopper tensor cores with software-pipelined async copies inside the persistent loop.
        assert reports[name]["wgmma"] >= 1, reports[name]
        assert reports[name]["async_copies"] >= 1, reports[name]
        assert reports[name]["stack_bytes"] == 0, reports[name]  # no register spills
    # The consumers poll with acquire loads; the producers publish with release atomics.
    assert reports["ag_gemm_kernel"]["acquire_loads"] >= 1
    assert reports["rs_reduce_kernel"]["acquire_loads"] >= 1
    assert reports["gemm_rs_kernel"]["release_atomics"] >= 2  # counter (acq_rel) + flag
    assert reports["raise_flag_kernel"]["release_atomics"] >= 1


@pytest.mark.slow
def test_overlap_kernels_compile_for_ampere():
    assert len(compile_reports("overlap", arch=80)) == 4
