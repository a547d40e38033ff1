"""CPU tests of the benchmark harness and of the dense-dispatch baseline it measures."""

import dataclasses
import json

import pytest
import torch

import kernelbase.backend
import moeblaze
from bench import breakdown, harness, moe_layer, readme_table
from bench.baselines import _grouped_mm_runs, dense_dispatch_moe_mlp
from kernelbase.profiling import profile_range

# The baselines compute every activation a bench shape has (bench.moe_layer.Shape.activation).
ACTIVATIONS = [
    moeblaze.SwiGLU(),
    moeblaze.Gated("gelu_tanh"),
    moeblaze.Ungated("relu2"),
    moeblaze.SwiGLU(gate_softcap=0.5, up_softcap=0.5),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_excluded():
    x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
    w = torch.randn(8, 16, requires_grad=True)  # 512 bytes

    def forward():
        s = torch.sigmoid(x @ w)  # mm saves x and w; sigmoid saves its output s (256 bytes)
        return (s * s).sum()  # saves s twice more: the same storage

    assert harness.saved_tensor_bytes(forward) == 128 + 512 + 256
    assert harness.saved_tensor_bytes(forward, exclude=(x, w)) == 256


def test_saved_tensor_bytes_sees_save_for_backward_and_whole_storages():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, buffer):
            ctx.save_for_backward(buffer[:2])  # a view keeps its whole storage alive
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2, None

    a = torch.randn(3, requires_grad=True)
    buffer = torch.randn(100, dtype=torch.float64)  # 800 bytes
    assert harness.saved_tensor_bytes(lambda: Scale.apply(a, buffer)) == 800


def test_time_ms_on_cpu_is_a_median_of_real_runs():
    import time

    calls = []
    ms = harness.time_ms(lambda: (calls.append(1), time.sleep(0.002)), device="cpu", rep_ms=10)
    assert ms >= 2.0
    assert len(calls) >= 4  # warm-up plus at least three timed runs


def test_host_us_is_the_wall_time_per_call():
    import time

    calls = []
    us = harness.host_us(lambda: (calls.append(1), time.sleep(0.001)), device="cpu", runs=20)
    assert 1000 <= us < 20000
    assert len(calls) == 10 + 20  # warm-up and timed calls


def test_graph_us_is_none_off_cuda():
    assert harness.graph_us(lambda: torch.ones(3), device="cpu") is None


def test_cuda_memory_is_none_on_cpu():
    assert harness.cuda_memory(lambda: torch.ones(3), "cpu") is None


def test_write_results_and_print_table(tmp_path, capsys):
    env = dict(harness.environment("cpu"), gpu="NVIDIA H100 80GB HBM3")
    rows = [{"shape": "tiny", "ms": 1.23456, "saved_MiB": None}, {"shape": "big", "ms": 12345.6}]
    path = harness.write_results("demo", rows, env, tmp_path)
    assert path == tmp_path / "demo-nvidia-h100-80gb-hbm3.json"
    stored = json.loads(path.read_text())
    assert stored["benchmark"] == "demo" and stored["rows"] == rows
    assert {"gpu", "torch", "triton", "cuda", "commit", "date"} <= stored["env"].keys()

    harness.print_table(rows, ["shape", "ms", "saved_MiB"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["shape", "ms", "saved_MiB"]
    assert lines[1].split() == ["tiny", "1.235", "-"]
    assert lines[2].split() == ["big", "12346", "-"]


@pytest.mark.parametrize(
    "dtype, T, d, F, E, k",
    [
        (torch.float64, 37, 24, 20, 5, 2),  # float64: per-expert torch.mm fallback
        (torch.float32, 45, 32, 24, 6, 3),  # float32, 16-byte rows: torch._grouped_mm on CPU
    ],
    ids=["float64-loop-fallback", "float32-grouped_mm"],
)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_dense_dispatch_matches_reference(dtype, T, d, F, E, k, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    topk_ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # E-1 idle
    topk_weights = torch.rand(T, k, generator=g, dtype=dtype) + 0.1
    w13 = torch.randn(E, activation.pre_width(F), d, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(E, d, F, generator=g, dtype=dtype) / F**0.5
    assert _grouped_mm_runs(x, w13.transpose(1, 2)) == (dtype == torch.float32)

    def run(fn, cast):
        leaves = [
            t.detach().to(cast, copy=True).requires_grad_() for t in (x, topk_weights, w13, w2)
        ]
        out = fn(leaves[0], topk_ids, *leaves[1:], activation=activation)
        out.backward(torch.ones_like(out) + torch.arange(d, dtype=cast) / d)
        return [out, *(t.grad for t in leaves)]

    got = run(dense_dispatch_moe_mlp, dtype)
    expected = run(moeblaze.moe_mlp_reference, torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(["out", "x", "topk_weights", "w13", "w2"], got, expected, strict=True):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e}"


def test_moe_layer_end_to_end_on_cpu(tmp_path):
    shape = moe_layer.SHAPES["tiny"]
    argv = ["--shapes", "tiny", "--providers", "grouped_mm,loop", "--out", str(tmp_path)]
    rows = moe_layer.main([*argv, "--rep-ms", "5", "--no-plot"])
    stored = json.loads((tmp_path / "moe_layer-cpu.json").read_text())
    assert stored["rows"] == rows
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (p, m) for p in ("grouped_mm", "loop") for m in ("fwd", "bwd", "fwd+bwd")
    ]
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["TFLOP/s"] > 0 and r["frac_dense_gemm"] > 0
        assert r["peak_mem_MiB"] is None  # CPU
    assert all(r["speedup_vs_grouped_mm"] == 1 for r in rows if r["provider"] == "grouped_mm")
    # The dense-dispatch path keeps at least its [T*k, d] float32 dispatch buffer for backward.
    dispatch_mib = shape.T * shape.k * shape.d * 4 / harness.MIB
    assert all(r["saved_MiB"] >= dispatch_mib for r in rows if r["provider"] == "grouped_mm")


def test_readme_table_without_and_with_gpu_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold\n{readme_table.END}\nrest\n")
    cpu = {"benchmark": "routing_plan", "env": {"gpu": "cpu"}, "rows": [{"ms": 1.0}]}
    readme_table.rewrite_readme(readme, readme_table.render([(tmp_path / "a.json", cpu)]))
    assert readme.read_text() == (
        f"intro\n{readme_table.START}\n{readme_table.NO_RESULTS}\n{readme_table.END}\nrest\n"
    )

    env = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "torch": "2.11",
        "triton": "3.6",
        "cuda": "13.0",
        "commit": "abc1234",
        "date": "2026-01-01",
    }
    rows = [
        {
            "shape": "tiny",
            "T": 256,
            "k": 2,
            "E": 8,
            "provider": "torch",
            "ms": 0.5,
            "speedup_vs_torch": 1.0,
        }
    ]
    gpu = {"benchmark": "routing_plan", "env": env, "rows": rows}
    readme_table.rewrite_readme(readme, readme_table.render([(tmp_path / "b.json", gpu)]))
    text = readme.read_text()
    assert "#### NVIDIA H100 80GB HBM3" in text and "commit `abc1234`" in text
    assert "| tiny | 256 | 2 | 8 | torch | 0.5 | 1 |" in text
    assert text.startswith("intro\n") and text.endswith(f"{readme_table.END}\nrest\n")

    # The breakdown shows the default policy's GEMM stages, not kernels or enclosing ranges.
    base = {"shape": "tiny", "provider": "moeblaze-activation", "calls": 1, "ms": 0.2}
    stages = [
        dict(base, what="range", name="moeblaze.grad_act", **{"TFLOP/s": 300.0}),
        dict(base, what="range", name="moeblaze.moe_mlp.backward"),
        dict(base, what="kernel", name="grad_act_kernel"),
        dict(base, provider="moeblaze-none", what="range", name="moeblaze.gate_up"),
    ]
    breakdown = {"benchmark": "moe_layer_breakdown", "env": env, "rows": stages}
    text = readme_table.render([(tmp_path / "c.json", breakdown)])
    assert "moeblaze.grad_act" in text and "300" in text
    assert "moe_mlp.backward" not in text and "_kernel" not in text and "gate_up" not in text


@pytest.mark.gpu
def test_cuda_timing_and_memory():
    device = torch.device("cuda")
    a = torch.randn(1024, 1024, device=device)
    assert harness.time_ms(lambda: a @ a, device=device) > 0
    memory = harness.cuda_memory(lambda: torch.empty(2**20, device=device), device)  # 4 MiB
    assert memory.retained_bytes >= 4 * harness.MIB
    assert memory.peak_bytes >= memory.retained_bytes
    assert harness.environment(device)["gpu"] != "cpu"


@pytest.mark.gpu
def test_graph_us_times_replays():
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    graphed = harness.graph_us(lambda: a @ a, device=device)
    flushed = harness.time_ms(lambda: a @ a, device=device) * 1e3
    assert 0.5 * flushed < graphed < 2 * flushed  # a 137 GFLOP GEMM: launches are noise there


@pytest.mark.gpu
def test_range_times_on_cuda_are_the_ranges_kernel_time():
    """A named range appears once, with the GPU time of the kernels launched inside it (torch
    records it as a CPU event and a GPU annotation; the CPU event's device time was 0.2 ms for a
    5.7 ms kernel on an H100), and the annotation is no kernel."""
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)

    def step():
        with profile_range("moeblaze.test_range"):
            for _ in range(4):
                a @ a

    prof = breakdown.profile_step(step, iters=3, device=device)
    (timed,) = breakdown.range_times(prof, "moeblaze.test_range", 3, device)
    kernels = breakdown.kernel_times(prof, 3)
    assert all(k.name != "moeblaze.test_range" for k in kernels), kernels
    gemm_ms = sum(k.ms for k in kernels)
    assert timed.calls == 1 and 0.95 * gemm_ms <= timed.ms <= 1.5 * gemm_ms, (timed, kernels)


def test_moe_layer_bench_reports_moeblaze_keeping_less_than_dense_dispatch(
    tmp_path, monkeypatch, capsys
):
    # moeblaze's torch stages keep the same bytes as its kernels (tests/moeblaze) and run
    # without the slow interpreter.
    monkeypatch.setattr(kernelbase.backend, "_forced", kernelbase.Backend.TORCH)
    providers = "moeblaze-activation,moeblaze-up_proj,moeblaze-none,grouped_mm"
    providers += ",moeblaze-deterministic"  # an optional provider, named here
    argv = ["--shapes", "tiny", "--providers", providers, "--modes", "fwd", "--out", str(tmp_path)]
    rows = {r["provider"]: r for r in moe_layer.main([*argv, "--rep-ms", "1", "--no-plot"])}
    for r in rows.values():
        assert "error" not in r, r
    # The header comes before the rows, after the notes on what CPU timings mean; one thread.
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert any("say nothing about the speed of the GPU kernels" in line for line in lines)
    table = [line for line in lines if not line.startswith("#")]
    assert table[0].split() == list(moe_layer.COLUMNS), table[0]
    assert table[1].split()[:3] == ["tiny", "moeblaze-activation", "fwd"]
    assert torch.get_num_threads() == 1
    # Where a fwd+bwd step's time goes: moeblaze's stage ranges, with the stages' FLOPs.
    stored = json.loads((tmp_path / "moe_layer_breakdown-cpu.json").read_text())["rows"]
    stages = {(r["provider"], r["name"]): r for r in stored if r["what"] == "range"}
    for stage, calls in [("gate_up", 1), ("grad_act", 1), ("grad_w13", 1), ("down_combine", 1)]:
        row = stages["moeblaze-activation", f"moeblaze.{stage}"]
        assert row["calls"] == calls and row["ms"] > 0 and row["TFLOP/s"] > 0, row
    assert stages["moeblaze-up_proj", "moeblaze.gate_up"]["calls"] == 2  # recomputed in backward
    assert not any(p == "grouped_mm" for p, _ in stages)
    saved = {p: r["saved_MiB"] for p, r in rows.items()}
    # The tiny shape (T=256, k=2, d=128, F=96): h [S, 2F] is 0.375 MiB in float32, the dispatch
    # path keeps its [S, d] buffers and intermediates.
    assert saved["moeblaze-up_proj"] < 0.05 < saved["moeblaze-activation"]
    assert saved["moeblaze-activation"] < saved["moeblaze-none"] < saved["grouped_mm"]
    assert saved["moeblaze-activation"] < saved["grouped_mm"] / 3
    assert saved["moeblaze-deterministic"] == saved["moeblaze-activation"]  # keeps the same


def test_moe_layer_bench_runs_the_shapes_activation(tmp_path, monkeypatch):
    # A shape's activation reaches every provider, and the FLOPs count its pre-activation's
    # width (F without a gate): the ungated tiny shape does 2/3 of the gated one's work.
    monkeypatch.setattr(kernelbase.backend, "_forced", kernelbase.Backend.TORCH)
    tiny = moe_layer.SHAPES["tiny"]
    ungated = dataclasses.replace(tiny, name="tiny-relu2", activation=moeblaze.Ungated("relu2"))
    monkeypatch.setitem(moe_layer.SHAPES, ungated.name, ungated)
    assert 3 * ungated.fwd_flops == 2 * tiny.fwd_flops
    argv = ["--shapes", ungated.name, "--providers", "moeblaze-activation,grouped_mm,loop"]
    argv += ["--modes", "fwd", "--rep-ms", "1", "--no-plot", "--out", str(tmp_path)]
    rows = moe_layer.main(argv)
    assert [r["provider"] for r in rows] == ["moeblaze-activation", "grouped_mm", "loop"]
    for r in rows:
        assert "error" not in r and r["activation"] == "Ungated(fn='relu2')", r
        assert r["TFLOP/s"] * r["ms"] * 1e9 == pytest.approx(ungated.fwd_flops)
    stored = json.loads((tmp_path / "moe_layer_breakdown-cpu.json").read_text())["rows"]
    (gate_up,) = [r for r in stored if r["name"] == "moeblaze.gate_up"]
    flops = 2 * ungated.T * ungated.k * ungated.d * ungated.F  # [S, d] x [d, F]
    assert gate_up["TFLOP/s"] * gate_up["ms"] * 1e9 == pytest.approx(flops * gate_up["calls"])


def test_overlap_bench_end_to_end_on_cpu(tmp_path):
    from bench import overlap as overlap_bench

    assert overlap_bench.main(["--shapes", "tiny", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "overlap-cpu.json").read_text())
    rows = stored["rows"]
    assert {r["op"] for r in rows} == {"ag", "rs"}
    for r in rows:
        assert "error" not in r, r
        assert r["serial_ms"] > 0 and r["fused_ms"] > 0 and r["pipelined_ms"] > 0


def test_overlap_thresholds_need_every_larger_shape_to_win():
    """bench.overlap.thresholds: the smallest FLOPs from which the schedule won everywhere
    larger; two shapes of equal FLOPs both have to win."""
    from bench.overlap import thresholds

    def row(op, M, serial, pipelined, fused, inner=4, cols=2):  # FLOPs = 16 * M
        times = dict(serial_ms=serial, pipelined_ms=pipelined, fused_ms=fused)
        return dict(op=op, M=M, inner=inner, cols=cols, **times)

    rows = [
        row("ag", 1, 1.0, 2.0, 1.5),  # neither wins
        row("ag", 2, 1.0, 1.02, 1.0),  # both win (pipelined within 3% of serial)
        row("ag", 4, 1.0, 1.1, 0.9),  # fused wins, pipelined loses ...
        row("ag", 2, 1.0, 0.9, 0.9, inner=8),  # ... also at equal FLOPs (64)
        row("ag", 8, 1.0, 0.8, 0.81),
        row("rs", 8, 1.0, 0.8, 2.0),
    ]
    assert thresholds(rows, "fused") == {
        "all_gather_matmul": 32,
        "matmul_reduce_scatter": None,
    }
    assert thresholds(rows, "pipelined") == {
        "all_gather_matmul": 128,
        "matmul_reduce_scatter": 128,
    }


def test_overlap_bench_compares_tiles(tmp_path):
    from bench import overlap as overlap_bench

    tiles = "16x16x16:1:1,16x32x16:2:1:ptr"
    argv = ["--shapes", "tiny", "--ops", "ag", "--world-sizes", "2", "--tiles", tiles]
    assert overlap_bench.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "overlap-cpu.json").read_text())["rows"]
    assert [r["tile"] for r in rows] == ["16x16x16:1:1:tma", "16x32x16:2:1:ptr"], rows
    for r in rows:
        assert "error" not in r and r["fused_present_ms"] > 0, r
    with pytest.raises(SystemExit):
        overlap_bench.main(["--tiles", "128x256:8"])
    with pytest.raises(SystemExit):
        overlap_bench.main(["--tiles", "128x256x64:8:3:fast"])


def test_overlap_bench_with_an_emulated_link(tmp_path):
    from bench import overlap as overlap_bench

    argv = ["--shapes", "tiny", "--world-sizes", "2", "--emulate-link", "0.5"]
    assert overlap_bench.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "overlap-cpu.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"ag", "rs"}
    for r in rows:  # tiny: M=48, hidden 32, ffn 96 -> AG K=32, RS N=32; fp32 on the CPU
        assert "error" not in r and r["emulated_link_GBps"] == 0.5, r
        assert r["link_ms"] == pytest.approx(2 * 1 * 24 * 32 * 4 / 0.5 / 1e6), r
        assert r["comm_ms"] >= r["link_ms"], r


def test_overlap_dist_bench_end_to_end_on_cpu(tmp_path):
    from bench import overlap_dist

    assert overlap_dist.main(["--spawn", "2", "--shapes", "tiny", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "overlap_dist-cpu.json").read_text())
    assert stored["env"]["world_size"] == 2
    rows = stored["rows"]
    assert {r["op"] for r in rows} == {"ag", "rs"}
    for r in rows:
        assert min(r[f"{mode}_ms"] for mode in ("serial", "pipelined", "fused")) > 0, r
        assert r["comm_ms"] > 0 and r["compute_ms"] > 0 and "efficiency" in r, r


def test_tune_expert_sweeps_configs_on_cpu(tmp_path, capsys):
    from bench import tune_expert

    argv = ["--shapes", "tiny", "--stages", "gate_up,down_combine", "--block-ms", "64"]
    assert tune_expert.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tune_expert-cpu.json").read_text())["rows"]
    # The current config (*), it with pointer loads (:ptr), the other candidate.
    assert [(r["stage"], r["config"].endswith("*"), ":ptr" in r["config"]) for r in rows] == [
        ("gate_up", True, False),
        ("gate_up", False, True),
        ("gate_up", False, False),
        ("down_combine", True, False),
        ("down_combine", False, True),
        ("down_combine", False, False),
    ]
    for r in rows:
        assert r["ms"] > 0 and r["dense_TFLOP/s"] > 0, r
        assert r["diff"] < 1e-5, f"{r['config']} changes the result of {r['stage']}"
    assert "('scatter_rows', 64): GemmConfig(" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("activation", "table"), [("gpt-oss", "INTERLEAVED"), ("inkling2", "SOFTCAPPED")]
)
def test_tune_expert_sweeps_epilogue_variants_on_cpu(activation, table, tmp_path, capsys):
    """--activation gpt-oss (inkling2): gate_up and grad_act run their interleaved (soft-capped)
    variants, every config to the same result, and the winners are printed for
    GPU_CONFIGS_INTERLEAVED (GPU_CONFIGS_SOFTCAPPED)."""
    from bench import tune_expert

    argv = ["--shapes", "tiny", "--stages", "gate_up,grad_act", "--block-ms", "64"]
    assert tune_expert.main([*argv, "--activation", activation, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tune_expert-cpu.json").read_text())["rows"]
    # grad_act also with h read through a tensor descriptor (GemmConfig.epilogue_tma), without
    # its prefetch (GemmConfig.epilogue_prefetch; nothing to leave out under the interpreter)
    # and with its epilogue in two slices of 32 columns (GemmConfig.epilogue_n).
    assert [r["stage"] for r in rows] == ["gate_up"] * 3 + ["grad_act"] * 6
    assert rows[5]["config"] == "64x32x32 w4 s1:h-tma", rows[5]
    assert rows[6]["config"] == "64x32x32 w4 s1:no-prefetch", rows[6]
    assert rows[-1]["config"] == "64x64x16 w4 s1 e32", rows[-1]
    for r in rows:
        assert r["ms"] > 0, r
        assert r["diff"] < 1e-5, f"{r['config']} changes the result of {r['stage']}"
    out = capsys.readouterr().out
    assert activation in out and f"{table} ('grad_act', 64): GemmConfig(" in out


def test_ep_combine_bench_end_to_end_on_cpu(tmp_path):
    from bench import ep_combine

    rows = ep_combine.main(["--shapes", "tiny", "--out", str(tmp_path), "--no-plot"])
    assert [r["provider"] for r in rows] == list(ep_combine.PROVIDERS)
    assert json.loads((tmp_path / "ep_combine-cpu.json").read_text())["rows"] == rows
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in rows)
