"""Tile-config sweep of the expert-MLP kernels: each stage of the Triton path, on one shape at a
time, timed with candidate `GemmConfig`s against cuBLAS on a dense GEMM of the same FLOPs.

# T tokens, k top-k, S = T*k slots, d hidden, F expert ffn, E experts

Stages (moeblaze.ops.Stages) and the kernel whose config they use:
    gate_up       [S, d] x w13 -> h [S, 2F] (the "activation" forward)      gate_up
    down_combine  a [S, F] (weighted) x w2 -> out [T, d]                    scatter_rows
    grad_act      dout [T, d] x w2^T -> dh [S, 2F] (and a)                  grad_act
    grad_input    dh [S, 2F] x w13 -> dx [T, d]                             scatter_rows
    grad_w2       dout^T a per expert -> [E, d, F]                          expert_wgrad
    grad_w13      dh^T x per expert -> [E, 2F, d]                           expert_wgrad

(expert_wgrad's BLOCK_M runs along the gathered side's columns, d, and BLOCK_N along the sorted
side's, F or 2F: grad_w13 is computed as x^T dh and stored transposed.)

Columns: shape, stage, config (BLOCK_M x BLOCK_N x BLOCK_K, warps, stages; "*" marks the one
in moeblaze.kernels.expert_mlp.GPU_CONFIGS; "e32" for grad_act's epilogue in slices of 32
columns, GemmConfig.epilogue_n; ":ptr" for GemmConfig(tma=False), every operand read
by pointer loads, else weights and sorted rows go through tensor descriptors; ":h-tma" for
grad_act reading h through one too, GemmConfig.epilogue_tma; ":no-prefetch" for grad_act not
asking L2 for h's lines before its main loop, GemmConfig.epilogue_prefetch), ms (median,
triton.testing.do_bench), TFLOP/s, frac_cublas (TFLOP/s over that of one dense cuBLAS GEMM of
the same FLOPs, bench.harness.dense_gemm_tflops, as bench.moe_layer's frac_dense_gemm),
vs_current (this config's speed over the current one's) and diff (largest difference of the
stage's output from the current config's, relative to its largest value: a config that gives
another result, beyond summation order, is a bug to report). The best config per stage is printed
as the GPU_CONFIGS entry to put in; a candidate that fails to compile or run is reported and
skipped. Results go to tune_expert-<gpu>.json.

gate_up and grad_act run each shape's activation (bench.moe_layer.Shape.activation: SwiGLU,
GeGLU, ReLU²). `--activation gpt-oss` runs them with GPT-OSS's SwiGLU instead, gate and up
interleaved (their other kernel variants, INTERLEAVED), and `--activation inkling2` with Inkling
2's soft-capped SwiGLU; the "*" config is then the GPU_CONFIGS_INTERLEAVED (or
GPU_CONFIGS_SOFTCAPPED) entry where there is one (`epilogue_configs`), and the winners are
printed for that table.

    python -m bench.tune_expert                               # GPU: mixtral, qwen3, deepseek-ish
    python -m bench.tune_expert --shapes qwen3-30b-a3b --stages grad_act,grad_w13 --block-ms 64
    python -m bench.tune_expert --shapes gpt-oss-20b --stages gate_up,grad_act --activation gpt-oss
    python -m bench.tune_expert --shapes tiny --out OUTDIR    # CPU smoke run (interpreter)

On the CPU the kernels run under the Triton interpreter with interpreter-sized candidates:
that shows the script works, nothing about speed.
"""

import argparse
import dataclasses
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():  # must precede the import of any @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import harness  # noqa: E402
from bench.moe_layer import SHAPES, Shape, make_inputs, stage_flops  # noqa: E402
from kernelbase.gemm import GemmConfig, device_arch  # noqa: E402
from moeblaze.activation import SWIGLU, SwiGLU  # noqa: E402
from moeblaze.kernels.expert_mlp import (  # noqa: E402
    TritonStages,
    config_key,
    epilogue_configs,
    gpu_config,
)
from moeblaze.routing_plan import build_routing_plan  # noqa: E402

GPU_SHAPES = ("mixtral", "qwen3-30b-a3b", "deepseek-ish")
# The activation of gate_up and grad_act in place of the shape's (the other stages do not
# depend on it).
ACTIVATIONS = {
    "swiglu": SWIGLU,
    "gpt-oss": SwiGLU(alpha=1.702, limit=7.0, up_offset=1.0, interleaved=True),
    "inkling2": SwiGLU(gate_softcap=4.0, up_softcap=25.0),
}
STAGE_KERNEL = {
    "gate_up": "gate_up",
    "down_combine": "scatter_rows",
    "grad_act": "grad_act",
    "grad_input": "scatter_rows",
    "grad_w2": "expert_wgrad",
    "grad_w13": "expert_wgrad",
}


def _cfg(bm, bn, bk, warps, stages, epilogue_n=None) -> GemmConfig:
    return GemmConfig(bm, bn, bk, num_warps=warps, num_stages=stages, epilogue_n=epilogue_n)


# Candidates besides the current config: (BLOCK_N, BLOCK_K, warps, stages) for the row-tile
# kernels at the plan's block_m (the configs before the current ones among them); full configs
# for the weight gradient.
ROW_TILE_CANDIDATES = [
    (64, 64, 8, 4),  # gate_up and grad_act at BLOCK_M=128 before the wider tiles
    (64, 64, 4, 4),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (256, 64, 8, 3),
    (128, 32, 8, 5),
    (256, 32, 8, 4),
]
# grad_act also with other epilogue slices than GRAD_ACT_EPILOGUE_COLUMNS: (BLOCK_N, BLOCK_K,
# warps, stages, epilogue_n); 32 columns build spill-free at 128x128 on sm_90, a 64-wide tile in
# one slice.
GRAD_ACT_EPILOGUE_CANDIDATES = [
    (128, 64, 8, 4, 32),
    (256, 64, 8, 3, 32),
    (64, 64, 8, 4, 64),
    (128, 64, 4, 3, 16),  # 96 KB of shared memory: two CTAs per SM, epilogue beside main loop
]
# Fewer than 5 stages leave the weight gradient's loads unpipelined (moeblaze.kernels.expert_mlp,
# GPU_CONFIGS); the first candidate is the config before that was known, the second the one
# before 128 gathered x 256 sorted columns, for comparison.
WGRAD_CANDIDATES = [
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 128, 64, 8, 5),
    _cfg(128, 128, 32, 8, 6),
    _cfg(128, 128, 64, 4, 5),
    _cfg(128, 256, 64, 8, 5),
    _cfg(256, 128, 64, 8, 5),
    _cfg(64, 128, 64, 4, 5),
    _cfg(128, 64, 64, 4, 5),
]
INTERPRETER_CANDIDATES = [_cfg(16, 32, 32, 4, 1), _cfg(16, 64, 16, 4, 1)]


def candidates(kernel: str, block_m: int, activation=SWIGLU) -> list[GemmConfig]:
    """The current config of (kernel, block_m) on this GPU first (for `activation`'s epilogue:
    `gpu_config`), then it with the other operand loads (GemmConfig.tma; grad_act also with
    the other loads of h, GemmConfig.epilogue_tma, and the other choice of prefetching them,
    GemmConfig.epilogue_prefetch), then the other candidates (with tensor
    descriptors); on the CPU, interpreter-sized ones (grad_act's other also in two epilogue
    slices)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        current = gpu_config(kernel, block_m, activation, arch=device_arch(device))
        if kernel == "expert_wgrad":
            others = WGRAD_CANDIDATES
        else:
            others = [_cfg(block_m, *c) for c in ROW_TILE_CANDIDATES]
        if kernel == "grad_act":
            others += [_cfg(block_m, *c) for c in GRAD_ACT_EPILOGUE_CANDIDATES]
    else:
        current, others = INTERPRETER_CANDIDATES[0], INTERPRETER_CANDIDATES[1:]
        if kernel != "expert_wgrad":
            current, others = _cfg(block_m, 32, 32, 4, 1), [_cfg(block_m, 64, 16, 4, 1)]
        if kernel == "grad_act":
            others.append(dataclasses.replace(others[0], epilogue_n=32))
    flipped = [dataclasses.replace(current, tma=not current.tma)]
    if kernel == "grad_act":
        flipped.append(dataclasses.replace(current, epilogue_tma=not current.epilogue_tma))
        prefetch = not current.epilogue_prefetch
        flipped.append(dataclasses.replace(current, epilogue_prefetch=prefetch))
    return [current, *flipped, *(c for c in others if c != current and c not in flipped)]


def stage_call(stage: str, stages: TritonStages, tensors: dict, plan, activation=SWIGLU):
    """A zero-argument function running `stage` with `stages` on prepared tensors."""
    t = tensors
    calls = {
        "gate_up": lambda: stages.gate_up(
            t["x"],
            t["w13"],
            t["topk_weights"],
            plan,
            store_h=True,
            store_a=False,
            activation=activation,
        ),
        "down_combine": lambda: stages.down_combine(t["a"], t["w2"], plan, deterministic=False),
        "grad_act": lambda: stages.grad_act(
            t["dout"], t["w2"], t["h"], t["topk_weights"], plan, store_a=True, activation=activation
        ),
        "grad_input": lambda: stages.grad_input(t["dh"], t["w13"], plan, deterministic=False),
        "grad_w2": lambda: stages.grad_w2(t["dout"], t["a"], plan),
        "grad_w13": lambda: stages.grad_w13(t["dh"], t["x"], plan),
    }
    return calls[stage]


def prepare(shape: Shape, dtype, device) -> dict:
    """x, the routing, the weights (bench.moe_layer's inputs) and dout; sweep_shape adds the
    intermediate tensors (h, a, dh) of each plan."""
    inputs = make_inputs(shape, dtype, device)
    t = dict(
        x=inputs.x.detach(),
        topk_ids=inputs.topk_ids,
        topk_weights=inputs.topk_weights.detach(),
        w13=inputs.w13.detach(),
        w2=inputs.w2.detach(),
    )
    t["dout"] = torch.randn_like(t["x"])
    return t


def sweep_shape(
    shape: Shape, stage_names, block_ms, dtype, device, rep_ms, activation=None
) -> list[dict]:
    """Rows of every candidate config of `stage_names` on `shape`, its gate_up and grad_act
    with `activation` (None: the shape's own; another must have the same pre-activation
    width)."""
    activation = activation or shape.activation
    if activation.pre_width(shape.F) != shape.pre_width:
        raise ValueError(f"{activation!r} does not fit shape {shape.name} ({shape.activation!r})")
    t = prepare(shape, dtype, device)
    default = TritonStages()
    rows, dense = [], {}  # dense: FLOPs -> TFLOP/s of a dense GEMM
    for block_m in block_ms:
        plan = build_routing_plan(t["topk_ids"], shape.E, block_m=block_m)
        h, _ = stage_call("gate_up", default, t, plan, activation)()
        dh, _, a = stage_call("grad_act", default, dict(t, h=h), plan, activation)()
        tensors = dict(t, h=h, a=a, dh=dh)
        for stage in stage_names:
            kernel = STAGE_KERNEL[stage]
            if kernel == "expert_wgrad" and block_m != block_ms[0]:
                continue  # the weight gradient does not tile by block_m: sweep it once
            flops = stage_flops(stage, shape)
            if flops not in dense:  # timed once per FLOP count, not per block_m
                dense[flops] = harness.dense_gemm_tflops(flops, dtype, device)
            dense_tflops = dense[flops]
            current_ms = current_out = None
            for i, cfg in enumerate(candidates(kernel, block_m, activation)):
                key = config_key(kernel, block_m)
                fn = stage_call(stage, TritonStages({key: cfg}), tensors, plan, activation)
                row = dict(
                    shape=shape.name,
                    stage=stage,
                    block_m=key[1],
                    config=_describe(cfg) + ("*" if i == 0 else ""),
                    **{"dense_TFLOP/s": dense_tflops},
                )
                try:
                    out = _main_output(fn())
                    ms = harness.time_ms(fn, device=device, rep_ms=rep_ms)
                except Exception as error:  # a config that does not compile or fit: skip it
                    row["error"] = f"{type(error).__name__}: {error}"[:200]
                    traceback.print_exception(error, limit=-2, file=sys.stderr)
                    rows.append(row)
                    continue
                if i == 0:
                    current_ms, current_out = ms, out
                tflops = flops / (ms * 1e-3) / 1e12
                row.update(
                    ms=ms,
                    **{"TFLOP/s": tflops},
                    frac_cublas=tflops / dense_tflops,
                    vs_current=(current_ms / ms) if current_ms else None,
                    # Largest difference from the current config's output, relative to its
                    # largest magnitude: summation order only (a few ulps of the dtype).
                    diff=_relative_diff(out, current_out),
                    cfg=cfg,
                )
                rows.append(row)
    return rows


def _main_output(result) -> torch.Tensor:
    """The stage's main output (h, out, dh or the weight gradient)."""
    return result[0] if isinstance(result, tuple) else result


def _relative_diff(out: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None:
        return None
    scale = reference.float().abs().max().clamp_min(1e-30)
    return float((out.float() - reference.float()).abs().max() / scale)


def _describe(cfg: GemmConfig) -> str:
    loads = (":h-tma" if cfg.epilogue_tma else "") if cfg.tma else ":ptr"
    loads += "" if cfg.epilogue_prefetch else ":no-prefetch"
    epilogue = f" e{cfg.epilogue_n}" if cfg.epilogue_n else ""
    tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages}{epilogue}{loads}"


COLUMNS = ("shape", "stage", "config", "ms", "TFLOP/s", "frac_cublas", "vs_current", "diff")


def best_entries(rows, table: str = "") -> list[str]:
    """Per (shape, stage, block_m), the fastest config, as a GPU_CONFIGS line (for the
    GPU_CONFIGS_<table> of `epilogue_configs` where `table` names one, for the stages whose
    kernels have such variants)."""
    best = {}
    for row in rows:
        if "ms" not in row:
            continue
        key = (row["shape"], row["stage"], row["block_m"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    lines = []
    for (shape, stage, block_m), row in best.items():
        cfg, speedup = row["cfg"], row["vs_current"]
        versus = f"{speedup:.2f}x the current" if speedup else "the current failed"
        options = "" if cfg.tma else ", tma=False"
        options += f", epilogue_n={cfg.epilogue_n}" if cfg.epilogue_n else ""
        options += ", epilogue_tma=True" if cfg.epilogue_tma else ""
        options += "" if cfg.epilogue_prefetch else ", epilogue_prefetch=False"
        variant = f"{table} " if table and stage in ("gate_up", "grad_act") else ""
        lines.append(
            f"{shape:>14} {stage:>12}: {variant}({STAGE_KERNEL[stage]!r}, {block_m}): GemmConfig("
            f"{cfg.block_m}, {cfg.block_n}, {cfg.block_k}, num_warps={cfg.num_warps}, "
            f"num_stages={cfg.num_stages}{options})  # {row['ms']:.3g} ms, "
            f"{row['frac_cublas']:.2f} of cuBLAS, {versus}"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--shapes", default=",".join(GPU_SHAPES) if on_gpu else "tiny")
    parser.add_argument("--stages", default=",".join(STAGE_KERNEL))
    parser.add_argument("--block-ms", default="64,128", help="the plan's block_m values")
    parser.add_argument("--rep-ms", type=float, default=50 if on_gpu else 1)
    parser.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        help="gate_up/grad_act's; default: the shape's (bench.moe_layer.Shape.activation)",
    )
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    args = parser.parse_args(argv)
    device = harness.default_device()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    unknown = [s for s in args.stages.split(",") if s not in STAGE_KERNEL]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGE_KERNEL)}")
    env = harness.environment(device)
    rows = []
    activation = ACTIVATIONS.get(args.activation)  # None: each shape's
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {list(SHAPES)}")
        block_ms = [int(b) for b in args.block_ms.split(",")]
        stages = args.stages.split(",")
        rows += sweep_shape(SHAPES[name], stages, block_ms, dtype, device, args.rep_ms, activation)
        stored = [{k: v for k, v in r.items() if k != "cfg"} for r in rows]
        path = harness.write_results("tune_expert", stored, env, args.out)  # kept if stopped
    print(
        f"\nexpert-MLP stages on {env['gpu']} ({dtype}, {args.activation or 'each shape'}'s "
        f"activation; * = the current GPU_CONFIGS entry)"
    )
    harness.print_table(rows, COLUMNS)
    if not on_gpu:
        print(f"\nnote: {harness.CPU_TIMINGS}: the configs below are no advice")
    print("\nfastest per shape and stage:")
    table = epilogue_configs(activation)[0] if activation is not None else ""
    print("\n".join(best_entries(rows, table)))
    print(f"\nwrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
