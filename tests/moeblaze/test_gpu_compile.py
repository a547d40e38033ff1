"""The routing-plan and expert-MLP kernels compile for H100 (sm_90) and A100 (sm_80), checked
without a GPU by running the launchers on meta tensors (tests/gpu_compile.py)."""

from gpu_compile_testing import compile_reports

from moeblaze.activation import SWIGLU
from moeblaze.kernels.expert_mlp import GPU_CONFIGS, _activation_meta

PLAN_KERNELS = ("count_chunks_kernel", "place_slots_kernel")
OTHER_KERNELS = (*PLAN_KERNELS, "expert_bias_grad_kernel", "gather_sum_kernel")  # no GEMM
GEMM_KERNELS = ("gate_up_kernel", "grad_act_kernel", "scatter_rows_kernel", "expert_wgrad_kernel")


def _launched_configs(reports):
    return {
        (r["kernel"].removesuffix("_kernel"), r["constexprs"]["BLOCK_M"])
        for r in reports
        if r["kernel"] not in OTHER_KERNELS
    }


def test_kernels_compile_for_sm90_with_wgmma_pipelining_and_no_spills():
    reports = compile_reports("moeblaze")
    # Every GPU configuration moeblaze launches was compiled (wgrad: BLOCK_M of its output).
    expected = {(kernel, cfg.block_m) for (kernel, _), cfg in GPU_CONFIGS.items()}
    assert _launched_configs(reports) == expected, reports
    assert {r["kernel"] for r in reports} >= set(OTHER_KERNELS)
    for report in reports:
        assert report["stack_bytes"] == 0, report  # no register spills
        assert report["fp_fusion"] is True, report  # not Triton's default: COMPILE_OPTIONS
        # Tiles are read and written in vectors of at least 4 bf16 per thread (grad_act's
        # epilogue stored, and with pointer loads read h, one element per thread, down a column
        # with Triton 3.6, until its slices' columns came from an arange; a 64x16 slice has 4
        # elements per thread).
        assert report["access_vector_bytes"] is None or report["access_vector_bytes"] >= 8, report
        if report["kernel"] in OTHER_KERNELS:
            continue
        # Every GEMM uses Hopper tensor cores fed by software-pipelined async copies of both
        # operands, with copies and one wgmma in flight while the next step waits. (The weight
        # gradient's last, partial step with descriptors sits outside its main loop.)
        assert report["wgmma"] >= 1, report
        assert report["register_operands"] == 0, report
        assert report["wgmma_in_flight"] >= 1, report
        if report["tma"]:  # weights and sorted rows through the copy engine
            assert report["tma_copies"] >= 1, report
            # Gathered rows (all but scatter_rows have some) stay async pointer copies.
            gathers = report["kernel"] != "scatter_rows_kernel"
            assert (report["async_copies"] > 0) == gathers, report
            assert not gathers or report["copies_in_flight"] >= 1, report
        else:
            assert report["copies_in_flight"] >= 1, report
    # The GEMMs are built with and without tensor descriptors.
    gemms = [r for r in reports if r["kernel"] in GEMM_KERNELS]
    assert {(r["kernel"], r["tma"]) for r in gemms} == {
        (kernel, tma) for kernel in GEMM_KERNELS for tma in (True, False)
    }
    # The SwiGLU epilogues are built plain and clamped, with gate and up concatenated and
    # interleaved (GPT-OSS), at both tile heights; the biases in gate_up's and the combine's.
    swiglu_epilogues = {("gate_up_kernel", b) for b in (64, 128)} | {
        ("grad_act_kernel", b) for b in (64, 128)
    }
    for interleaved in (False, True):
        clamped = {
            (r["kernel"], r["constexprs"]["BLOCK_M"], r["tma"])
            for r in reports
            if r["activation"] is not None and r["activation"]["LIMIT"] is not None
            and r["activation"]["INTERLEAVED"] == interleaved
        }  # fmt: skip
        assert clamped == {(*ke, tma) for ke in swiglu_epilogues for tma in (True, False)}, reports
    # And the epilogues of GeGLU (moeblaze.Gated, Gemma 4's) and of experts without a gate
    # (moeblaze.Ungated), ReLU² and GELU.
    for fn, gated in (("gelu_tanh", True), ("relu2", False), ("gelu", False)):
        built = {
            (r["kernel"], r["constexprs"]["BLOCK_M"], r["tma"])
            for r in reports
            if r["activation"] is not None
            and (r["activation"]["ACT"], r["activation"]["GATED"]) == (fn, gated)
        }
        assert built == {(*ke, tma) for ke in swiglu_epilogues for tma in (True, False)}, reports
    # And Inkling 2's soft-capped SwiGLU.
    capped = {
        (r["kernel"], r["constexprs"]["BLOCK_M"], r["tma"])
        for r in reports
        if r["activation"] is not None and r["activation"]["GATE_SOFTCAP"] is not None
    }
    assert capped == {(*ke, tma) for ke in swiglu_epilogues for tma in (True, False)}, reports
    # grad_act reads h by pointer loads unless its config asks for a tensor descriptor
    # (GemmConfig.epilogue_tma, built too). Then a plain SwiGLU epilogue computes one sigmoid
    # per element, one exponential per slice; with h from shared memory Triton computed the
    # activation twice, in the accumulator's register layout and in the store's.
    grad_act = [r for r in reports if r["kernel"] == "grad_act_kernel"]
    assert {r["h_tma"] for r in grad_act if r["tma"]} == {False, True}, grad_act
    plain = _activation_meta(SWIGLU)  # the constexprs of a plain SwiGLU
    plain_grad_act = [r for r in grad_act if r["activation"] == plain and not r["h_tma"]]
    assert plain_grad_act, grad_act
    assert all(r["exp_ops"] == r["epilogue_split"] for r in plain_grad_act), plain_grad_act
    # Before its main loop, grad_act asks L2 for the lines of h its epilogue reads by pointers
    # (GemmConfig.epilogue_prefetch); nothing else prefetches.
    for report in reports:
        pointer_h = report["kernel"] == "grad_act_kernel" and not report["h_tma"]
        assert (report["l2_prefetches"] > 0) == pointer_h, report
    # gate_up's epilogue (one, not split): one exponential.
    plain_gate_up = [
        r for r in reports if r["kernel"] == "gate_up_kernel" and r["activation"] == plain
    ]
    assert plain_gate_up and all(r["exp_ops"] == 1 for r in plain_gate_up), plain_gate_up
    biased = {(r["kernel"], r["constexprs"]["BLOCK_M"], r["tma"]) for r in reports if r["bias"]}
    assert biased == {
        (kernel, block_m, tma)
        for kernel in ("gate_up_kernel", "scatter_rows_kernel")
        for block_m in (64, 128)
        for tma in (True, False)
    }, reports


def test_kernels_compile_for_ampere():
    """sm_80 has no wgmma: the same kernels lower to mma.sync (slower, but they must build)."""
    reports = compile_reports("moeblaze", arch=80)
    expected = {(kernel, cfg.block_m) for (kernel, _), cfg in GPU_CONFIGS.items()}
    assert _launched_configs(reports) == expected, reports
    assert not any(r["tma"] or r["tma_copies"] for r in reports), reports  # pointer loads
    # Every kernel fits the 99 KB of shared memory a block gets on sm_86 / sm_89.
    assert max(r["shared_bytes"] for r in reports) <= 99 * 1024, reports
    # PRE_HOPPER_CONFIGS: no spills but an 8-byte frame (gate_up with a clamped SwiGLU, Triton
    # 3.9), where the Hopper tiles spilled 40-200 B. Left out: scatter_rows' atomic epilogue,
    # which spills 72-200 B at 128x128 with Triton 3.9 (none with 3.6).
    spilled = [r for r in reports if r["kernel"] != "scatter_rows_kernel" and r["stack_bytes"] > 8]
    assert not spilled, spilled
