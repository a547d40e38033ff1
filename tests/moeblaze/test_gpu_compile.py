"""The expert-MLP and routing-plan kernels compile for H100 (sm_90), checked without a GPU."""

from gpu_compile_testing import compile_reports


def test_kernels_compile_for_sm90_with_wgmma_pipelining_and_no_spills():
    reports = compile_reports("moeblaze")
    assert len(reports) == 12, reports  # 10 expert-MLP configurations + 2 routing-plan kernels
    for report in reports:
        # No register spills in any configuration moeblaze launches on a GPU.
        assert report["stack_bytes"] == 0, report
        if report["kernel"] in ("count_chunks_kernel", "place_slots_kernel"):
            continue
        # Every GEMM uses Hopper tensor cores with software-pipelined async copies.
        assert report["wgmma"] >= 1, report
        assert report["async_copies"] >= 1, report


def test_kernels_compile_for_ampere():
    """sm_80 has no wgmma: the same kernels lower to mma.sync (slower, but they must build)."""
    assert len(compile_reports("moeblaze", arch=80)) == 12
