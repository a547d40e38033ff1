"""CPU tests of bench.kernel_profile: the CSV of Nsight Compute, the ncu command line (against a
stand-in ncu that runs the profiled child for real) and the workloads' single step."""

import json
import sys

import pytest
import torch

from bench import kernel_profile, moe_layer

LONG = """\
==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","1,234,500"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","61.25"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","launch__shared_mem_per_block_dynamic","byte","196,608"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","launch__shared_mem_per_block_static","byte","1,024"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","launch__registers_per_thread","register/thread","226"
"0","4242","python3.12","h","gate_up_kernel","1","7","(256, 1, 1)","(1,792, 1, 1)","0","9.0","Command line profiler metrics","sm__inst_executed.sum","inst","12"
"1","4242","python3.12","h","nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT(int)","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","800"
"1","4242","python3.12","h","nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT(int)","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","lts__t_sector_hit_rate.pct","%","n/a"
"""

WIDE = """\
"ID","Kernel Name","gpu__time_duration.sum","sm__warps_active.avg.pct_of_peak_sustained_active","launch__grid_size"
"","","usecond","%",""
"0","grad_act_kernel","2,000","24.5","16,128"
"1","grad_act_kernel","3","24.5","16,128"
"""


def test_long_form_csv():
    rows = kernel_profile.parse_ncu_csv(LONG, "moe:mixtral")
    assert rows == [
        dict(
            workload="moe:mixtral",
            kernel="gate_up_kernel",
            us=1234.5,
            sm_pct=61.25,
            smem_KiB=193.0,  # static + dynamic
            registers=226.0,
        ),
        dict(workload="moe:mixtral", kernel="nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", us=0.8),
    ]


def test_wide_form_csv_and_no_table():
    rows = kernel_profile.parse_ncu_csv(WIDE, "moe:qwen3-30b-a3b")
    assert rows == [
        dict(
            workload="moe:qwen3-30b-a3b",
            kernel="grad_act_kernel",
            us=2000.0,
            occupancy_pct=24.5,
            grid=16128.0,
        ),
        dict(
            workload="moe:qwen3-30b-a3b",
            kernel="grad_act_kernel",
            us=3.0,
            occupancy_pct=24.5,
            grid=16128.0,
        ),
    ]
    assert kernel_profile.parse_ncu_csv("==PROF== nothing profiled\n", "gemm-ag") == []


FAKE_NCU = '''\
"""Stand-in for ncu: an old ncu that rejects the optional metric, else runs the profiled
command (the workload's child process, for real) and writes a report; --import prints a CSV."""
import subprocess, sys
args = sys.argv[1:]
if "--import" in args:
    print(open(args[args.index("--import") + 1]).read(), end="")
    sys.exit(0)
assert args[:2] == ["--profile-from-start", "off"], args
metrics = args[args.index("--metrics") + 1]
if "gmma" in metrics:
    print("==ERROR== Failed to find metric " + metrics.split(",")[-1])
    sys.exit(1)
child = subprocess.run(args[args.index("--force-overwrite") + 1:])
with open(args[args.index("--export") + 1], "w") as report:
    report.write(CSV)
sys.exit(child.returncode)
'''


def test_ncu_command_line_runs_the_workload_and_drops_an_unknown_metric(tmp_path, capsys):
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\nCSV = {LONG!r}\n" + FAKE_NCU)
    fake.chmod(0o755)
    assert kernel_profile.find_ncu(str(fake)) == str(fake)
    assert kernel_profile.find_ncu(str(tmp_path / "missing")) is None
    csv_text = kernel_profile.profile(str(fake), "gemm-ag", tmp_path / "r.ncu-rep")
    assert "profiling without" in capsys.readouterr().err
    assert [r["kernel"] for r in kernel_profile.parse_ncu_csv(csv_text, "gemm-ag")] == [
        "gate_up_kernel",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT",
    ]
    with pytest.raises(RuntimeError, match="ncu failed"):
        kernel_profile.profile(str(fake), "no-such-workload", tmp_path / "r.ncu-rep")


def test_ncu_command_line_narrows_to_kernels_and_asks_for_the_full_set(tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"if '--import' in sys.argv: sys.exit(0)\n"
        f"open({str(tmp_path / 'args.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    fake.chmod(0o755)
    kernel_profile.profile(str(fake), "gemm-ag", tmp_path / "r.ncu-rep", "grad_act", full=True)
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[:6] == [
        "--profile-from-start",
        "off",
        "--kernel-name",
        "regex:grad_act",
        "--set",
        "full",
    ], args
    kernel_profile.profile(str(fake), "gemm-ag", tmp_path / "r.ncu-rep")
    args = json.loads((tmp_path / "args.json").read_text())
    assert "--set" not in args and "--kernel-name" not in args, args


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer")
def test_needs_a_gpu_and_names_the_workloads(capsys):
    assert kernel_profile.main(["--out", "unused"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="moe:<shape>, gemm-ag"):
        kernel_profile.run_workload("moe-mixtral")
    with pytest.raises(ValueError, match="unknown shape 'mixtrl'"):
        kernel_profile.run_workload("moe:mixtrl")


def test_workload_steps_run(monkeypatch):
    calls = []
    real = kernel_profile.moe_step

    def counting(shape_name, device):
        step = real(shape_name, device)

        def counted():
            calls.append(shape_name)
            step()

        return counted

    monkeypatch.setattr(kernel_profile, "moe_step", counting)
    micro = moe_layer.Shape("micro", T=16, d=32, F=16, E=4, k=2)  # quick under the interpreter
    monkeypatch.setitem(moe_layer.SHAPES, "micro", micro)
    assert kernel_profile.main(["--workload", "moe:micro"]) == 0
    assert calls == ["micro", "micro"]  # the warm-up, then the profiled step


def test_routing_workload_routes_and_plans(monkeypatch):
    plans = []
    from moeblaze import routing_plan  # the step imports build_routing_plan from there

    real_build = routing_plan.build_routing_plan

    def recording(topk_ids, num_experts, **kwargs):
        plan = real_build(topk_ids, num_experts, **kwargs)
        plans.append(plan)
        return plan

    monkeypatch.setattr(routing_plan, "build_routing_plan", recording)
    assert kernel_profile.main(["--workload", "routing"]) == 0
    assert len(plans) == 2  # the warm-up, then the profiled step
    counts = plans[-1].expert_counts
    assert counts.shape == (16,) and int(counts.sum()) == 64 * 4  # CPU shape: T=64, E=16, k=4
