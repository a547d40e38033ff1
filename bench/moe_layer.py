"""MoE MLP benchmark: moeblaze against the dense-dispatch (grouped_mm) and per-expert-loop paths.

# T tokens, d hidden, F expert ffn, E experts, k top-k, S = T*k slots

One row per shape, provider and mode (fwd, bwd, fwd+bwd), measured in one run on random inputs
(bf16 on CUDA, float32 on CPU) routed by a random softmax router. Every provider computes the
shape's activation (SwiGLU; GeGLU, ReLU² or soft-capped SwiGLU for the `ACTIVATION_SHAPES`),
whose pre-activation is P = 2F wide with a gate, F without:
  ms                    median time (do_bench on CUDA, wall clock on CPU)
  TFLOP/s               model FLOPs / time: fwd = 2*S*d*P + 2*S*F*d, bwd = 2 x fwd
  frac_dense_gemm       TFLOP/s over that of one dense GEMM with the same FLOPs (cuBLAS on CUDA)
  peak_mem_MiB          peak allocated during the call, above what was allocated before (CUDA)
  saved_MiB             bytes autograd keeps for backward after a forward, excluding parameters
                        and x (the same for every mode of a provider)
  retained_MiB          fwd rows, CUDA: memory still allocated after the forward minus the output
                        (cross-checks saved_MiB; also sees tensors kept outside save_for_backward)
  speedup_vs_grouped_mm grouped_mm ms / ms, same shape and mode

Then, per shape and provider (not the loop), where a fwd+bwd step's time goes (torch.profiler,
bench.breakdown; in moe_layer_breakdown-<gpu>.json, skipped with --no-breakdown):
  what = range          moeblaze's stages (kernelbase.profiling ranges): the GPU time of the
                        kernels each launches (CPU time on CPU), with the stage's model FLOPs
                        as TFLOP/s and frac_dense_gemm
  what = kernel         the largest GPU kernels of the step (CUDA)
  calls, ms             per step; share: of the step's GPU kernel time

On CPU without TRITON_INTERPRET=1, the moeblaze providers run their torch implementations, on
--threads torch threads (default 1): the CPU numbers show that the harness works, not how fast
the kernels are, and the benchmark says so (and warns when the machine is busy).

    python -m bench.moe_layer                    # model shapes on CUDA, `tiny` on CPU
    python -m bench.moe_layer --shapes tiny --providers grouped_mm,loop --out bench/results
    python -m bench.moe_layer --providers moeblaze-activation,moeblaze-deterministic
    python -m bench.moe_layer --shapes gemma4-ish,nemotron3-nano-ish,inkling2-ish --modes fwd+bwd
"""

import argparse
import dataclasses
import functools
import math
import sys
import traceback
from collections.abc import Callable

import torch

import moeblaze
from bench import breakdown, harness
from bench.baselines import dense_dispatch_moe_mlp, loop_moe_mlp
from kernelbase.profiling import profile_range
from moeblaze.activation import SWIGLU, Activation, Gated, SwiGLU, Ungated


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    T: int  # tokens
    d: int  # hidden size
    F: int  # expert ffn size
    E: int  # experts
    k: int  # experts per token
    activation: Activation = SWIGLU  # every provider's (the baselines' too)

    @property
    def pre_width(self) -> int:
        """The pre-activation's width: 2F gated, F without a gate."""
        return self.activation.pre_width(self.F)

    @property
    def fwd_flops(self) -> int:
        slots = self.T * self.k
        return 2 * slots * self.d * self.pre_width + 2 * slots * self.F * self.d


SHAPES = {
    s.name: s
    for s in [
        Shape("tiny", T=256, d=128, F=96, E=8, k=2),
        Shape("mixtral", T=16384, d=4096, F=14336, E=8, k=2),
        Shape("qwen3-30b-a3b", T=16384, d=2048, F=768, E=128, k=8),
        Shape("deepseek-ish", T=16384, d=2048, F=1408, E=64, k=6),
        Shape("gpt-oss-20b", T=16384, d=2880, F=2880, E=32, k=4),
        # Gemma 4 26B-A4B's experts (E, k, F, GeGLU with GELU's tanh form; d as its config
        # reports it, taken from public model cards, not checked against the weights).
        Shape("gemma4-ish", T=16384, d=2816, F=704, E=128, k=8, activation=Gated("gelu_tanh")),
        # Nemotron 3 Nano 30B-A3B's routed experts: ReLU² without a gate (model-card sizes).
        Shape(
            "nemotron3-nano-ish", T=16384, d=2688, F=1856, E=128, k=6, activation=Ungated("relu2")
        ),
        # Inkling 2's experts: soft-capped SwiGLU (transformers' Inkling2TextConfig defaults,
        # whose docstring names Inkling-2-Small; bf16 weights and gradients take 49 GB).
        Shape(
            "inkling2-ish",
            T=16384,
            d=4608,
            F=2304,
            E=384,
            k=8,
            activation=SwiGLU(gate_softcap=4.0, up_softcap=25.0),
        ),
    ]
}
GPU_SHAPES = ("mixtral", "qwen3-30b-a3b", "deepseek-ish")
CPU_SHAPES = ("tiny",)

PROVIDERS = ("moeblaze-activation", "moeblaze-up_proj", "moeblaze-none", "grouped_mm", "loop")
# Named with --providers only: moe_mlp(recompute="activation", deterministic=True).
OPTIONAL_PROVIDERS = ("moeblaze-deterministic",)
MODES = ("fwd", "bwd", "fwd+bwd")
FLOPS_PER_FWD = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}
# The per-expert loop is skipped on CPU above this many forward FLOPs (it would take minutes).
CPU_LOOP_MAX_FLOPS = 1e10

# The expert-MLP stages (moeblaze.ops's ranges "moeblaze.<stage>"), and those whose GEMM is as
# wide as the pre-activation (2F gated, F without a gate) besides S and d; the others' is F wide.
EXPERT_STAGES = ("gate_up", "down_combine", "grad_act", "grad_w2", "grad_input", "grad_w13")
PRE_WIDTH_STAGES = ("gate_up", "grad_input", "grad_w13")
PROFILED_STEPS = 5
KERNELS_SHOWN = 8
BREAKDOWN_COLUMNS = (
    "shape",
    "provider",
    "what",
    "name",
    "calls",
    "ms",
    "share",
    "TFLOP/s",
    "frac_dense_gemm",
)

COLUMNS = (
    "shape",
    "provider",
    "mode",
    "ms",
    "TFLOP/s",
    "frac_dense_gemm",
    "peak_mem_MiB",
    "saved_MiB",
    "retained_MiB",
    "speedup_vs_grouped_mm",
)


# One cuBLAS timing per FLOP count, shared by every row that divides by it.
dense_gemm_tflops = functools.cache(harness.dense_gemm_tflops)


def stage_flops(stage: str, shape: Shape) -> int:
    """Model FLOPs of one call of the expert-MLP stage `stage` (EXPERT_STAGES) on `shape`."""
    width = shape.pre_width if stage in PRE_WIDTH_STAGES else shape.F
    return 2 * shape.T * shape.k * shape.d * width


def provider_fn(name: str, activation: Activation = SWIGLU) -> Callable:
    if name == "moeblaze-deterministic":
        return functools.partial(moeblaze.moe_mlp, deterministic=True, activation=activation)
    if name.startswith("moeblaze-"):
        policy = name.removeprefix("moeblaze-")
        return functools.partial(moeblaze.moe_mlp, recompute=policy, activation=activation)
    fn = {"grouped_mm": dense_dispatch_moe_mlp, "loop": loop_moe_mlp}[name]
    return functools.partial(fn, activation=activation)


def random_routing(x: torch.Tensor, num_experts: int, top_k: int, generator: torch.Generator):
    """Top-k of a random linear softmax router over `x [T, d]`, weights renormalised over the k.

    Returns topk_ids [T, k] int64 and topk_weights [T, k] float32.
    """
    d = x.shape[1]
    router = torch.randn(d, num_experts, device=x.device, generator=generator) / math.sqrt(d)
    probs = torch.softmax(x.float() @ router, dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    return ids, weights / weights.sum(dim=-1, keepdim=True)


@dataclasses.dataclass(frozen=True)
class Inputs:
    x: torch.Tensor  # [T, d]
    topk_ids: torch.Tensor  # [T, k]
    topk_weights: torch.Tensor  # [T, k]
    w13: torch.Tensor  # [E, 2F, d] ([E, F, d] without a gate)
    w2: torch.Tensor  # [E, d, F]

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.topk_weights, self.w13, self.w2]


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random (never zero) inputs, scaled so activations stay O(1); all floats require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.T, shape.d, device=device, generator=g).to(dtype)
    ids, weights = random_routing(x, shape.E, shape.k, g)
    w13 = torch.randn(shape.E, shape.pre_width, shape.d, device=device, generator=g, dtype=dtype)
    w2 = torch.randn(shape.E, shape.d, shape.F, device=device, generator=g, dtype=dtype)
    return Inputs(
        x=x.requires_grad_(),
        topk_ids=ids,
        topk_weights=weights.requires_grad_(),
        w13=w13.mul_(1 / math.sqrt(shape.d)).requires_grad_(),
        w2=w2.mul_(1 / math.sqrt(shape.F)).requires_grad_(),
    )


def bench_provider(shape, provider, modes, inputs, dtype, device, rep_ms) -> list[dict]:
    """Rows of one provider on one shape, one per mode; a failing mode gets a row with `error`."""
    args = (inputs.x, inputs.topk_ids, inputs.topk_weights, inputs.w13, inputs.w2)
    base = {
        "shape": shape.name,
        "T": shape.T,
        "d": shape.d,
        "F": shape.F,
        "E": shape.E,
        "k": shape.k,
        "activation": repr(shape.activation),
        "dtype": str(dtype).removeprefix("torch."),
        "provider": provider,
    }
    try:
        fn = provider_fn(provider, shape.activation)
        saved = harness.saved_tensor_bytes(
            lambda: fn(*args), exclude=(inputs.x, inputs.w13, inputs.w2)
        )
    except Exception as error:  # report it, keep benchmarking the other providers
        return [_failed(base, mode, error) for mode in modes]
    rows = []
    for mode in modes:
        try:
            rows.append(_bench_mode(base, mode, fn, args, inputs, shape, dtype, device, rep_ms))
        except Exception as error:  # e.g. out of memory on one shape: report it, go on
            rows.append(_failed(base, mode, error))
        rows[-1]["saved_MiB"] = saved / harness.MIB
        for t in inputs.leaves:
            t.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bench_mode(base, mode, fn, args, inputs, shape, dtype, device, rep_ms) -> dict:
    grad_out = torch.randn(shape.T, shape.d, dtype=dtype, device=device)  # [T, d]
    if mode == "fwd":
        run, grads = (lambda: fn(*args)), None
    elif mode == "bwd":
        out = fn(*args)
        run, grads = (lambda: out.backward(grad_out, retain_graph=True)), inputs.leaves
    else:
        run, grads = (lambda: fn(*args).backward(grad_out)), inputs.leaves
    with profile_range(f"bench {shape.name} {base['provider']} {mode}"):
        ms = harness.time_ms(run, device=device, rep_ms=rep_ms, grad_to_none=grads)
    for t in inputs.leaves:
        t.grad = None
    memory = harness.cuda_memory(run, device)
    flops = FLOPS_PER_FWD[mode] * shape.fwd_flops
    tflops = flops / (ms * 1e-3) / 1e12
    row = dict(base, mode=mode, ms=ms, **{"TFLOP/s": tflops})
    row["frac_dense_gemm"] = tflops / dense_gemm_tflops(flops, dtype, device)
    row["peak_mem_MiB"] = memory.peak_bytes / harness.MIB if memory else None
    if memory and mode == "fwd":
        out_bytes = shape.T * shape.d * torch.empty((), dtype=dtype).element_size()
        row["retained_MiB"] = (memory.retained_bytes - out_bytes) / harness.MIB
    return row


def breakdown_rows(shape, provider, inputs, dtype, device) -> list[dict]:
    """Where one fwd+bwd step of `provider` spends its time: moeblaze's stage ranges, then the
    largest GPU kernels (see the module docstring)."""
    fn = provider_fn(provider, shape.activation)
    args = (inputs.x, inputs.topk_ids, inputs.topk_weights, inputs.w13, inputs.w2)
    grad_out = torch.randn(shape.T, shape.d, dtype=dtype, device=device)

    def step():
        fn(*args).backward(grad_out)
        for t in inputs.leaves:
            t.grad = None

    prof = breakdown.profile_step(step, iters=PROFILED_STEPS, device=device)
    kernels = breakdown.kernel_times(prof, PROFILED_STEPS)
    step_ms = sum(k.ms for k in kernels) or None
    rows = []
    base = dict(shape=shape.name, provider=provider)
    for timed in breakdown.range_times(prof, "moeblaze.", PROFILED_STEPS, device):
        row = dict(base, what="range", name=timed.name, calls=timed.calls, ms=timed.ms)
        row["share"] = timed.ms / step_ms if step_ms else None
        stage = timed.name.removeprefix("moeblaze.")
        if stage in EXPERT_STAGES and timed.ms > 0:
            flops = stage_flops(stage, shape)
            tflops = flops * timed.calls / (timed.ms * 1e-3) / 1e12
            row["TFLOP/s"] = tflops
            row["frac_dense_gemm"] = tflops / dense_gemm_tflops(flops, dtype, device)
        rows.append(row)
    for timed in kernels[:KERNELS_SHOWN]:
        row = dict(base, what="kernel", name=timed.name[:80], calls=timed.calls, ms=timed.ms)
        row["share"] = timed.ms / step_ms
        rows.append(row)
    return rows


def _failed(base: dict, mode: str, error: Exception) -> dict:
    print(f"{base['shape']} {base['provider']} {mode}: FAILED", file=sys.stderr)
    traceback.print_exception(error, limit=-3, file=sys.stderr)
    return dict(base, mode=mode, error=f"{type(error).__name__}: {error}"[:300])


def add_speedups(rows: list[dict], baseline: str = "grouped_mm") -> None:
    base_ms = {(r["shape"], r["mode"]): r.get("ms") for r in rows if r["provider"] == baseline}
    for r in rows:
        ref, ms = base_ms.get((r["shape"], r["mode"])), r.get("ms")
        r["speedup_vs_grouped_mm"] = ref / ms if ref and ms else None


def shape_parser(description: str, **options) -> argparse.ArgumentParser:
    """The command line of a benchmark over these shapes: --shapes, --device, --out, --seed,
    --no-plot (`options` go to ArgumentParser)."""
    parser = argparse.ArgumentParser(description=description, **options)
    parser.add_argument(
        "--shapes",
        help=f"comma list of {list(SHAPES)}; "
        f"default {','.join(GPU_SHAPES)} on CUDA, {','.join(CPU_SHAPES)} on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    return parser


def device_and_shapes(args) -> tuple[torch.device, list[Shape]]:
    """The device and the shapes `shape_parser`'s arguments name (the defaults of the device)."""
    device = torch.device(args.device) if args.device else harness.default_device()
    default_shapes = ",".join(GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    return device, [SHAPES[s] for s in parse_list(args.shapes or default_shapes, SHAPES, "shapes")]


def shape_benchmark(name: str, description: str, argv: list[str] | None):
    """`shape_parser`'s command line, parsed: (args, device, shapes, environment); prints the
    environment line."""
    args = shape_parser(description).parse_args(argv)
    device, shapes = device_and_shapes(args)
    env = harness.environment(device)
    print(
        f"# {name} on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}",
        flush=True,
    )
    if device.type == "cpu":
        print(f"# note: {harness.CPU_TIMINGS}", flush=True)
    return args, device, shapes, env


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return items


def main(argv: list[str] | None = None) -> list[dict]:
    parser = shape_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help=f"comma list of {list(PROVIDERS + OPTIONAL_PROVIDERS)}; default all but the last",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma list")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--rep-ms", type=float, default=100, help="timed time per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip the per-stage and per-kernel profile"
    )
    args = parser.parse_args(argv)

    device, shapes = device_and_shapes(args)
    on_cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    providers = parse_list(args.providers, PROVIDERS + OPTIONAL_PROVIDERS, "providers")
    modes = parse_list(args.modes, MODES, "modes")

    notes = harness.pin_cpu_threads(device, args.threads)
    env = harness.environment(device)
    print(
        f"# moe_layer on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, commit {env['commit']}, {dtype}",
        flush=True,
    )
    for note in notes:
        print(f"# note: {note}", flush=True)
    print_row = harness.RowPrinter(COLUMNS, widths={"provider": max(map(len, providers))})
    rows: list[dict] = []
    stages: list[dict] = []  # the breakdown
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device, args.seed)
        for provider in providers:
            if provider == "loop" and not on_cuda and shape.fwd_flops > CPU_LOOP_MAX_FLOPS:
                print(
                    f"# {shape.name} loop: skipped on CPU ({shape.fwd_flops:.2g} FLOPs per forward)"
                )
                continue
            rows += bench_provider(shape, provider, modes, inputs, dtype, device, args.rep_ms)
            add_speedups(rows)
            path = harness.write_results("moe_layer", rows, env, args.out)  # after every provider
            for r in rows[-len(modes) :]:
                print_row(r)
            if not args.no_breakdown and provider != "loop":
                try:
                    stages += breakdown_rows(shape, provider, inputs, dtype, device)
                except Exception as error:  # report it, keep benchmarking
                    stages.append(
                        _failed(dict(shape=shape.name, provider=provider), "breakdown", error)
                    )
                harness.write_results("moe_layer_breakdown", stages, env, args.out)
        del inputs
        if on_cuda:
            torch.cuda.empty_cache()

    if stages:
        print("\nwhere a fwd+bwd step's time goes (torch.profiler, per step):")
        harness.print_table(stages, BREAKDOWN_COLUMNS)
    print()
    plot_args = dict(
        x=("shape", "mode"),
        series="provider",
        metrics=("TFLOP/s", "peak_mem_MiB", "saved_MiB"),
        title=f"MoE MLP, {env['gpu']}, {str(dtype).removeprefix('torch.')}",
    )
    harness.report(
        rows, COLUMNS, path if rows else None, table=False, **({} if args.no_plot else plot_args)
    )
    return rows


if __name__ == "__main__":
    main()
