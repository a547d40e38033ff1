"""Rewrite the benchmark table in README.md from the GPU results in bench/results/*.json.

The block between `<!-- bench-table:start -->` and `<!-- bench-table:end -->` is replaced. CPU
results are left out (they show that the harness runs, not how fast anything is).

    python -m bench.readme_table
"""

import argparse
import json
from pathlib import Path

from bench import harness

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
NO_RESULTS = (
    "No GPU results are committed yet: run `bash bench/run_gpu.sh bench/results` on a GPU "
    "machine, commit the JSON files, then run `python -m bench.readme_table`."
)

# What the README shows of each benchmark: a caption, which rows, which columns.
VIEWS = {
    "moe_layer": (
        "MoE MLP, forward+backward",
        lambda row: row.get("mode") == "fwd+bwd",
        (
            "shape",
            "provider",
            "ms",
            "TFLOP/s",
            "frac_dense_gemm",
            "peak_mem_MiB",
            "saved_MiB",
            "speedup_vs_grouped_mm",
        ),
    ),
    "moe_layer_breakdown": (
        "MoE MLP stages, forward+backward, moeblaze-activation (torch.profiler)",
        lambda row: row.get("provider") == "moeblaze-activation" and "TFLOP/s" in row,
        ("shape", "name", "calls", "ms", "share", "TFLOP/s", "frac_dense_gemm"),
    ),
    "routing_plan": (
        "Routing plan",
        lambda row: True,
        ("shape", "T", "k", "E", "provider", "ms", "speedup_vs_torch"),
    ),
    "ep_combine": (
        "Expert parallelism's combine (k rows per token summed)",
        lambda row: True,
        ("shape", "T", "k", "d", "provider", "ms", "GB/s", "speedup_vs_torch"),
    ),
    "csrc_kernels": (
        "Compiled kernels (csrc/) against Triton and torch, microseconds, T = 16384, k = 8 (every "
        "T, E and k in the JSON)",
        lambda row: row.get("T") == 16384 and row.get("k") == 8,
        ("kernel", "T", "E", "k", "provider", "us", "speedup_vs_torch"),
    ),
    "tune_expert": (
        "Expert-MLP stages with their current tile config (every candidate in the JSON)",
        lambda row: str(row.get("config", "")).endswith("*"),
        ("shape", "stage", "block_m", "config", "ms", "TFLOP/s", "frac_cublas"),
    ),
    "overlap": (
        "Overlap on one GPU (LocalWorld, measured; projections are in the JSON)",
        lambda row: True,
        (
            "op",
            "W",
            "M",
            "serial_ms",
            "pipelined_ms",
            "fused_ms",
            "auto_mode",
            "efficiency",
            "fused_vs_serial",
            "frac_cublas",
        ),
    ),
}


def load_results(results_dir: Path) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted(Path(results_dir).glob("*.json"))]


def render(results: list[tuple[Path, dict]], repo: Path = harness.REPO) -> str:
    """Markdown for the README block: per GPU, per benchmark, its environment and a table."""
    gpu_results = [(p, r) for p, r in results if r["env"].get("gpu", "cpu") != "cpu"]
    if not gpu_results:
        return NO_RESULTS
    parts = []
    for gpu in dict.fromkeys(r["env"]["gpu"] for _, r in gpu_results):
        parts.append(f"#### {gpu}")
        for path, result in gpu_results:
            if result["env"]["gpu"] != gpu:
                continue
            env, name = result["env"], result["benchmark"]
            caption, keep, columns = VIEWS.get(name, (name, lambda row: True, None))
            rows = [row for row in result["rows"] if keep(row)]
            columns = columns or list(dict.fromkeys(c for row in rows for c in row))
            if any("error" in row for row in rows):
                columns = [*columns, "error"]
            where = (
                path.resolve().relative_to(repo) if path.resolve().is_relative_to(repo) else path
            )
            parts.append(
                f"{caption} (`{where}`): torch {env.get('torch')}, Triton {env.get('triton')}, "
                f"CUDA {env.get('cuda')}, commit `{env.get('commit')}`, {env.get('date')}\n\n"
                + harness.markdown_table(rows, columns)
            )
    return "\n\n".join(parts)


def rewrite_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(harness.RESULTS_DIR))
    parser.add_argument("--readme", default=str(harness.REPO / "README.md"))
    args = parser.parse_args(argv)
    rewrite_readme(Path(args.readme), render(load_results(Path(args.results))))
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
