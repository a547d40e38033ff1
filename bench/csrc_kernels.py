"""Compiled (csrc/) routing plan and router top-k against their Triton and torch versions.

# T tokens (router rows), k top-k, E experts, S = T*k slots

Plan providers, each building a complete plan from `topk_ids [T, k]` int64 as its user calls it:
- `compiled`: a fresh plan buffer, then `fill_routing_plan` (one launch, no host sync; invalid
  ids are counted in the plan's `invalid_ids`),
- `triton`: the Triton launcher `launch_plan` on a fresh buffer (two launches, no sync),
- `build`: `build_routing_plan()` as moe_mlp calls it (the compiled plan where it is built, and
  the deferred id check: a pinned copy of `invalid_ids` behind an event, no sync),
- `build+check`: `build_routing_plan(check_ids=True)`, the debugging mode (one host sync),
- `build-unchecked`: `build_routing_plan(check_ids=False)`, no id check: `build` less this is what
  the deferred check costs, this less `compiled` what the rest of the Python around it costs,
- `torch`: the torch path of the plan on the GPU (stable sort, bincount, cumsum, tile metadata;
  it syncs to size the tiles).
Router providers, from float32 logits `[T, E]` to (ids, weights, scores) with the scores of
`--score-func` (softmax; sigmoid, DeepSeek-V3's; sqrtsoftplus, DeepSeek-V4's):
- `compiled`: `router_topk` (one launch),
- `torch`: `router_topk_reference` (scores, stable sort for the ties, gather, normalise),
- `torch_topk`: the same with `torch.topk`, ties in any order.
Times (`us`) are `do_bench` medians in microseconds (L2 flushed between runs), at every
T in {1024, 16384, 65536}, E in {8, 64, 128, 256}, k in {2, 6, 8} (k <= E) by default;
`host_us` is the host's time per call, calls back to back (`bench.harness.host_us`): where it
is near `us`, launching or a synchronisation bounds the call, not the kernels. `graph_us` is
the device time per call replayed from a CUDA graph of calls back to back
(`bench.harness.graph_us`: no launch gaps, no flush, inputs warm in L2, as inside a captured
training step; the deferred id check is not captured, so `build` runs as `build-unchecked`
there); empty for the plan providers that synchronise (`build+check`, `torch`).

    python -m bench.csrc_kernels [--T 16384] [--E 128] [--k 8] [--score-func sigmoid] [--out DIR]

GPU only: on a machine without CUDA or without the compiled modules it stops with the reason.
"""

import argparse
import functools

import torch

from bench import harness
from kernelbase import compiled

COLUMNS = ("kernel", "T", "E", "k", "provider", "us", "graph_us", "host_us", "speedup_vs_torch")
# (kernel, provider) that synchronise with the host: no CUDA graph can hold them.
SYNCHRONISING = {("plan", "build+check"), ("plan", "torch")}


def parse_ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def plan_runs(topk_ids: torch.Tensor, num_experts: int) -> dict:
    from moeblaze.kernels.compiled import fill_routing_plan
    from moeblaze.kernels.routing_plan import launch_plan
    from moeblaze.reference import fill_plan_torch
    from moeblaze.routing_plan import RoutingPlan, build_routing_plan, plan_numel

    num_tokens, top_k = topk_ids.shape
    num_slots, device = topk_ids.numel(), topk_ids.device

    def fresh_plan() -> RoutingPlan:
        buffer = torch.empty(
            plan_numel(num_slots, num_experts, 64), dtype=torch.int32, device=device
        )
        return RoutingPlan.from_buffer(buffer, num_slots, num_experts, top_k, 64)

    def on_fresh_plan(fill):
        def run():
            plan = fresh_plan()
            fill(topk_ids, plan)
            return plan

        return run

    return {
        "compiled": on_fresh_plan(fill_routing_plan),
        "triton": on_fresh_plan(launch_plan),
        "build": functools.partial(build_routing_plan, topk_ids, num_experts),
        "build+check": functools.partial(build_routing_plan, topk_ids, num_experts, check_ids=True),
        "build-unchecked": functools.partial(
            build_routing_plan, topk_ids, num_experts, check_ids=False
        ),
        "torch": on_fresh_plan(fill_plan_torch),
    }


def router_runs(logits: torch.Tensor, top_k: int, score_func: str) -> dict:
    from moeblaze.kernels.compiled import router_topk
    from moeblaze.reference import router_scores, router_topk_reference

    def torch_topk():  # torch.topk selection, ties in any order
        scores = router_scores(logits, score_func)
        ids = scores.topk(top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        return ids, weights / (weights.sum(-1, keepdim=True) + 1e-20), scores

    return {
        "compiled": functools.partial(router_topk, logits, top_k, score_func),
        "torch": functools.partial(router_topk_reference, logits, top_k, score_func),
        "torch_topk": torch_topk,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", default="1024,16384,65536", help="tokens, comma list")
    parser.add_argument("--E", default="8,64,128,256", help="experts, comma list")
    parser.add_argument("--k", default="2,6,8", help="top-k, comma list (k <= E)")
    parser.add_argument("--kernels", default="plan,router", help="comma list of plan, router")
    parser.add_argument(
        "--score-func",
        default="softmax",
        choices=("softmax", "sigmoid", "sqrtsoftplus"),
        help="the router's score function",
    )
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench.csrc_kernels times CUDA kernels and needs a CUDA GPU; none here")
    if compiled.load("moeblaze") is None:
        raise SystemExit(f"bench.csrc_kernels needs moeblaze._C: {compiled.reason('moeblaze')}")
    device = torch.device("cuda")
    env = harness.environment(device)
    print(
        f"# csrc_kernels on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}",
        flush=True,
    )

    rows, path = [], None
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for num_tokens in parse_ints(args.T):
        for num_experts in parse_ints(args.E):
            for top_k in (k for k in parse_ints(args.k) if k <= num_experts):
                g = torch.Generator(device=device).manual_seed(args.seed)
                logits = torch.randn(num_tokens, num_experts, device=device, generator=g)
                topk_ids = logits.topk(top_k, dim=-1).indices  # [T, k] int64, random routing
                shape = dict(T=num_tokens, E=num_experts, k=top_k)
                for kernel in kernels:
                    runs = (
                        plan_runs(topk_ids, num_experts)
                        if kernel == "plan"
                        else router_runs(logits, top_k, args.score_func)
                    )
                    found = {
                        p: harness.time_ms(run, device=device) * 1e3 for p, run in runs.items()
                    }
                    for provider, us in found.items():
                        rows.append(
                            dict(
                                kernel=kernel,
                                **shape,
                                provider=provider,
                                us=us,
                                graph_us=None
                                if (kernel, provider) in SYNCHRONISING
                                else harness.graph_us(runs[provider], device=device),
                                host_us=harness.host_us(runs[provider], device=device),
                                speedup_vs_torch=found["torch"] / us,
                            )
                        )
                    times = "  ".join(f"{p} {us:.1f} us" for p, us in found.items())
                    print(f"{kernel} T={num_tokens} E={num_experts} k={top_k}: {times}", flush=True)
                path = harness.write_results("csrc_kernels", rows, env, args.out)

    plot_args = dict(
        x=("kernel", "T", "E", "k"),
        series="provider",
        metrics=("us",),
        title=f"Compiled kernels, {env['gpu']}",
    )
    harness.report(rows, COLUMNS, path, **({} if args.no_plot else plot_args))
    return rows


if __name__ == "__main__":
    main()
