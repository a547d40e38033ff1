"""The overlap kernels compile for H100 (sm_90) and A100 (sm_80), checked without a GPU by running
the launchers on meta tensors (tests/gpu_compile.py)."""

import pytest
from gpu_compile_testing import compile_reports


@pytest.mark.slow
def test_overlap_kernels_compile_for_sm90_with_flag_atomics():
    # bf16 operands (float32: test_float32_gemms_fit_in_shared_memory).
    all_reports = [r for r in compile_reports("overlap") if r["operand_type"] != "*fp32"]
    # The variants a world launches by default: operands through tensor descriptors, no link.
    reports = {
        (r["kernel"], r["scope"]): r for r in all_reports if not r["link"] and r["tma"] is not False
    }
    assert set(reports) == {
        ("ag_gemm_kernel", "gpu"),
        ("gemm_rs_kernel", "gpu"),
        ("gemm_rs_kernel", "sys"),
        ("rs_reduce_kernel", "gpu"),
        ("rs_reduce_kernel", "sys"),
        ("raise_flag_kernel", None),
        ("wait_peers_kernel", "sys"),
        ("link_wait_kernel", None),
    }, sorted(reports)
    for report in all_reports:
        assert report["fp_fusion"] is True, report  # not Triton's default: COMPILE_OPTIONS
        # No global access of one element per instruction: the RS reduction once read its
        # partial rows (addresses from a table, alignment unknown to the compiler) 2 bytes at a
        # time, 512 loads per thread and block at W = 8.
        assert report["narrow_global_accesses"] == 0, report
        if report["kernel"] == "rs_reduce_kernel":
            assert report["access_vector_bytes"] == 16, report
    gemms = [r for r in all_reports if r["kernel"] in ("ag_gemm_kernel", "gemm_rs_kernel")]
    assert sorted((r["kernel"], r["tma"]) for r in gemms) == sorted(
        [("ag_gemm_kernel", True)] * 3  # b [K, n] and b = weight^T; with a link
        + [("ag_gemm_kernel", False)]
        + [("gemm_rs_kernel", True)] * 3  # gpu and sys scope; with a link
        + [("gemm_rs_kernel", False)]
    ), gemms
    for report in gemms:
        # Hopper tensor cores fed from shared memory by a software pipeline inside the
        # persistent loop: TMA copies issued stages ahead (2 per stage: A and B), or async
        # copies left in flight; a wgmma in flight. (The AG-GEMM once loaded A synchronously and
        # waited for every MMA, because its A stride was not specialised: 0.23 of cuBLAS.)
        assert report["wgmma"] >= 1, report
        assert report["register_operands"] == 0, report
        assert report["wgmma_in_flight"] >= 1, report
        assert report["stack_bytes"] == 0, report  # no register spills
        assert report["shared_bytes"] <= 227 * 1024, report  # an H100 block's limit
        assert report["access_vector_bytes"] == 16, report  # 16-byte vectors per thread
        if report["tma"]:
            assert report["tma_copies"] >= 2 * 3 and report["async_copies"] == 0, report
            if report["kernel"] == "ag_gemm_kernel":  # waits on flags, then reads by TMA
                # Triton fences the async proxy in any TMA main loop (the GEMM-RS, which waits
                # on no flag, has that one only): the AG-GEMM needs its own after the wait.
                assert (
                    report["proxy_fences"] > reports[("gemm_rs_kernel", "gpu")]["proxy_fences"]
                ), report
        else:
            assert report["copies_in_flight"] >= 1 and report["tma_copies"] == 0, report
    # Every flag wait is bounded by the GPU clock, so timeout_s is real time.
    for key in [
        ("ag_gemm_kernel", "gpu"),
        ("rs_reduce_kernel", "gpu"),
        ("wait_peers_kernel", "sys"),
    ]:
        assert reports[key]["clock_reads"] >= 2, reports[key]
    # The consumers poll with acquire loads (or atomics); the producers publish with release
    # atomics.
    assert reports[("ag_gemm_kernel", "gpu")]["acquire_polls"] >= 1
    assert reports[("raise_flag_kernel", None)]["release_atomics"] >= 1
    for scope in ("gpu", "sys"):
        assert reports[("rs_reduce_kernel", scope)]["acquire_polls"] >= 1
        assert reports[("gemm_rs_kernel", scope)]["release_atomics"] >= 2  # counter + flag
    # DistWorld's flags cross GPUs: every one of their atomics is at system scope.
    for key in [
        ("gemm_rs_kernel", "sys"),
        ("rs_reduce_kernel", "sys"),
        ("wait_peers_kernel", "sys"),
    ]:
        assert reports[key]["sys_scope_atomics"] >= 1, reports[key]
        assert reports[key]["sys_scope_atomics"] == (
            reports[key]["acquire_polls"] + reports[key]["release_atomics"]
        ), reports[key]
    assert reports[("gemm_rs_kernel", "gpu")]["sys_scope_atomics"] == 0


@pytest.mark.slow
def test_float32_gemms_fit_in_shared_memory():
    """float32 operands get their own default tile (overlap.fused.GPU_TILE_CONFIG_FP32): the bf16
    tile's three stages would need 262 KB of shared memory, which failed to launch on an H100
    (OutOfResources, 227 KB per block). Without TF32 (torch's default) the products are IEEE
    float32 FMAs, no wgmma: the tile must also leave the FMA accumulators in registers."""
    gemms = [
        r
        for r in compile_reports("overlap")
        if r["operand_type"] == "*fp32" and r["kernel"] in ("ag_gemm_kernel", "gemm_rs_kernel")
    ]
    assert sorted(r["kernel"] for r in gemms) == ["ag_gemm_kernel", "gemm_rs_kernel"], gemms
    for report in gemms:
        assert report["shared_bytes"] <= 227 * 1024, report
        assert report["stack_bytes"] == 0, report
        assert report["tma_copies"] >= 2 * 3, report  # pipelined, as the bf16 GEMMs


@pytest.mark.slow
def test_emulated_link_keeps_the_gemms_pipelined_and_waits_on_the_clock():
    """LocalWorld(link_gbps=...) builds LINK variants: the same pipelined, spill-free main loop,
    plus waits on the GPU clock (overlap.kernels.link)."""
    reports = [r for r in compile_reports("overlap") if r["operand_type"] != "*fp32"]
    plain = {
        r["kernel"]: r
        for r in reports
        if r["link"] is False and r["scope"] == "gpu" and r["tma"] is not False
    }
    linked = {r["kernel"]: r for r in reports if r["link"]}
    assert set(linked) == {"ag_gemm_kernel", "gemm_rs_kernel", "rs_reduce_kernel"}, linked
    for kernel in ("ag_gemm_kernel", "gemm_rs_kernel"):
        report = linked[kernel]
        assert report["wgmma"] >= 1, report
        assert report["register_operands"] == 0, report
        assert report["tma_copies"] == plain[kernel]["tma_copies"] >= 6, report
        assert report["wgmma_in_flight"] >= 1, report
    for kernel, report in linked.items():
        assert report["stack_bytes"] == 0, report
        assert report["clock_reads"] > plain[kernel]["clock_reads"], (report, plain[kernel])
    waits = [r for r in reports if r["kernel"] == "link_wait_kernel"]
    assert len(waits) == 2 and all(r["clock_reads"] >= 2 for r in waits), waits


@pytest.mark.slow
def test_overlap_kernels_compile_for_ampere():
    reports = compile_reports("overlap", arch=80)
    # No TMA on Ampere: worlds there use pointer loads (FusedContext's tile.tma), as the report
    # does.
    assert len(reports) == 15, [(r["kernel"], r["tma"], r["link"]) for r in reports]
    assert all(not r["tma"] and r["tma_copies"] == 0 for r in reports), reports
