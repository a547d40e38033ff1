"""Routing-plan benchmark: `moeblaze.build_routing_plan` against the same plan built from torch ops.

# T tokens, k top-k, E experts, S = T*k slots

The torch baseline computes what a dense-dispatch MoE computes before its GEMMs: a stable sort of
the slots by expert, its inverse permutation, per-expert counts (bincount) and offsets (cumsum).
moeblaze's plan also holds the grouped-GEMM tile metadata, and by default checks that the ids
lie in [0, E) (one device-to-host sync); both are timed here as users call it.

    python -m bench.routing_plan    # the model shapes' (T, k, E) on CUDA, `tiny` on CPU
"""

import argparse
import functools

import torch

import moeblaze
from bench import harness
from bench.moe_layer import CPU_SHAPES, GPU_SHAPES, SHAPES, parse_list, random_routing

PROVIDERS = ("moeblaze", "torch")
COLUMNS = ("shape", "T", "k", "E", "provider", "ms", "speedup_vs_torch")


def torch_routing_plan(topk_ids: torch.Tensor, num_experts: int):
    """Stable sort of slots by expert, its inverse, counts and offsets, with plain torch ops."""
    ids = topk_ids.reshape(-1)  # [S]
    order = torch.sort(ids, stable=True).indices  # [S] slot ids grouped by expert
    inverse = torch.empty_like(order)  # [S] sorted position of each slot
    inverse[order] = torch.arange(order.numel(), device=ids.device)
    counts = torch.bincount(ids, minlength=num_experts)  # [E]
    offsets = torch.cumsum(counts, 0)  # [E]
    return order, inverse, counts, offsets


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        help=f"comma list of {list(SHAPES)}; "
        f"default {','.join(GPU_SHAPES)} on CUDA, {','.join(CPU_SHAPES)} on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else harness.default_device()
    default_shapes = ",".join(GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    shapes = [SHAPES[s] for s in parse_list(args.shapes or default_shapes, SHAPES, "shapes")]
    env = harness.environment(device)
    print(
        f"# routing_plan on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}",
        flush=True,
    )

    rows = []
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(args.seed)
        x = torch.randn(shape.T, shape.d, device=device, generator=g)  # [T, d]
        topk_ids, _ = random_routing(x, shape.E, shape.k, g)  # [T, k]
        runs = {
            "moeblaze": functools.partial(moeblaze.build_routing_plan, topk_ids, shape.E),
            "torch": functools.partial(torch_routing_plan, topk_ids, shape.E),
        }
        found = {}
        for provider, run in runs.items():
            found[provider] = harness.time_ms(run, device=device)
            rows.append(
                {
                    "shape": shape.name,
                    "T": shape.T,
                    "k": shape.k,
                    "E": shape.E,
                    "provider": provider,
                    "ms": found[provider],
                }
            )
        for r in rows[-len(runs) :]:
            r["speedup_vs_torch"] = found["torch"] / r["ms"]
        path = harness.write_results("routing_plan", rows, env, args.out)

    plot_args = dict(
        x=("shape",), series="provider", metrics=("ms",), title=f"Routing plan, {env['gpu']}"
    )
    harness.report(rows, COLUMNS, path if rows else None, **({} if args.no_plot else plot_args))
    return rows


if __name__ == "__main__":
    main()
