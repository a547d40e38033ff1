"""The expert-MLP and routing-plan kernels compile for H100 (sm_90), checked without a GPU."""

from sm90_testing import sm90_reports


def test_kernels_compile_for_sm90_with_wgmma_pipelining_and_no_spills():
    reports = sm90_reports("moeblaze")
    assert len(reports) == 12, reports  # 10 expert-MLP configurations + 2 routing-plan kernels
    for report in reports:
        # No register spills in any configuration moeblaze launches on a GPU.
        assert report["stack_bytes"] == 0, report
        if report["kernel"] in ("count_chunks_kernel", "place_slots_kernel"):
            continue
        # Every GEMM uses Hopper tensor cores with software-pipelined async copies.
        assert report["wgmma"] >= 1, report
        assert report["async_copies"] >= 1, report
