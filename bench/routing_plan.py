"""Routing-plan benchmark: `moeblaze.build_routing_plan` against the same plan built from torch ops.

# T tokens, k top-k, E experts, S = T*k slots

The torch baseline computes what a dense-dispatch MoE computes before its GEMMs: a stable sort of
the slots by expert, its inverse permutation, per-expert counts (bincount) and offsets (cumsum).
moeblaze's plan also holds the grouped-GEMM tile metadata, and by default checks that the ids
lie in [0, E) (one device-to-host sync); both are timed here as users call it.

    python -m bench.routing_plan    # the model shapes' (T, k, E) on CUDA, `tiny` on CPU
"""

import functools

import torch

import moeblaze
from bench import harness
from bench.moe_layer import random_routing, shape_benchmark

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
    args, device, shapes, env = shape_benchmark("routing_plan", __doc__.split("\n\n")[0], argv)

    rows = []
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(args.seed)
        x = torch.randn(shape.T, shape.d, device=device, generator=g)  # [T, d]
        topk_ids, _ = random_routing(x, shape.E, shape.k, g)  # [T, k]
        runs = {
            "moeblaze": functools.partial(moeblaze.build_routing_plan, topk_ids, shape.E),
            "torch": functools.partial(torch_routing_plan, topk_ids, shape.E),
        }
        rows += harness.time_providers(
            runs, device=device, baseline="torch", shape=shape.name, T=shape.T, k=shape.k, E=shape.E
        )
        path = harness.write_results("routing_plan", rows, env, args.out)

    plot_args = dict(
        x=("shape",), series="provider", metrics=("ms",), title=f"Routing plan, {env['gpu']}"
    )
    harness.report(rows, COLUMNS, path if rows else None, **({} if args.no_plot else plot_args))
    return rows


if __name__ == "__main__":
    main()
