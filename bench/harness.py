"""The one harness every benchmark in bench/ uses: environment, timing, memory, results, plots.

- Timing: `triton.testing.do_bench` median on CUDA; a wall-clock median on CPU; both after
  warm-up.
- Memory: peak bytes allocated during a call (CUDA), and bytes a forward keeps for backward
  (tensors packed by autograd, counted once per storage).
- Results: `bench/results/<name>-<gpu slug>.json` holds the rows and the environment (GPU name,
  torch / Triton / CUDA versions, git commit, date); rows are printed as a table and plotted.
"""

import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
MIB = 2**20


CPU_TIMINGS = (
    "CPU timings show that the benchmark runs; they say nothing about the speed of the GPU kernels"
)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pin_cpu_threads(device: torch.device, threads: int) -> list[str]:
    """On the CPU, run torch ops on `threads` threads (a fixed count makes CPU timings
    comparable run to run) and return the warnings a reader of CPU timings needs; nothing on a
    GPU. The thread count goes into `environment()` as "threads"."""
    if device.type != "cpu":
        return []
    torch.set_num_threads(threads)
    notes = [f"{CPU_TIMINGS} ({threads} torch thread(s)). Memory columns kept for backward hold."]
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores - threads + 0.5:
        notes.append(
            f"the machine is busy (load average {load:.1f} on {cores} cores): CPU timings are "
            f"noisy; rerun on an idle machine to compare them"
        )
    return notes


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a result depends on: GPU name (or "cpu"), versions, git commit, date."""
    device = torch.device(device) if device is not None else default_device()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit() -> str | None:
    """Short sha of HEAD, with "-dirty" if tracked or new files differ (bench/results aside).

    Where the tree is not a git checkout, the value of MOEBLAZE_GIT_COMMIT is used (None if unset).
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MOEBLAZE_GIT_COMMIT")
    return sha + ("-dirty" if dirty else "")


def gpu_slug(gpu: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------
# Timing


def time_ms(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median milliseconds of `fn()` after warm-up.

    CUDA: `triton.testing.do_bench(..., return_mode="median")` (it also flushes L2 between runs).
    CPU: wall clock; warm up for `warmup_ms`, then run for `rep_ms` (at least 3, at most 100 runs).
    `grad_to_none` tensors get `.grad = None` before every run, so backward never accumulates.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    return _wall_clock_median_ms(fn, warmup_ms, rep_ms, grad_to_none or ())


def time_providers(
    runs: dict[str, Callable[[], Any]], *, device, baseline: str, **fields: Any
) -> list[dict[str, Any]]:
    """One row per provider of `runs` (name -> function), timed by `time_ms` one after the other:
    `fields`, the provider, its median ms and `speedup_vs_<baseline>`, baseline's ms / its own."""
    found = {provider: time_ms(run, device=device) for provider, run in runs.items()}
    return [
        {**fields, "provider": provider, "ms": ms, f"speedup_vs_{baseline}": found[baseline] / ms}
        for provider, ms in found.items()
    ]


def host_us(fn: Callable[[], Any], *, device: torch.device | str, runs: int = 200) -> float:
    """Microseconds of host time per call of `fn()`: `runs` calls back to back (after 10 to warm
    up), timed on the wall clock without waiting for the device in between. Where this is
    close to `time_ms`, launching (or a hidden synchronisation) bounds the call, not the GPU."""
    device = torch.device(device)
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed / runs * 1e6


def graph_us(
    fn: Callable[[], Any], *, device: torch.device | str, rep_ms: float = 2
) -> float | None:
    """Microseconds of device time per call of `fn()` replayed from a CUDA graph of calls back to
    back (`triton.testing.do_bench_cudagraph`, median of its replays): no launch gaps, no host
    time and no L2 flush, so the ids and logits of one call are in L2 as a router's output is
    for the plan built from it. Beside `time_ms` (flushed, one launch per timed call) it tells a
    kernel's own time from the launch latency and cold caches around it. None off CUDA.

    `fn` must not synchronise with the host: the capture then fails (reported, None returned),
    and a failed capture can leave torch's default CUDA generator in its capture state, so that
    later draws from it raise; callers use generators of their own."""
    if torch.device(device).type != "cuda":
        return None
    import triton.testing

    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except RuntimeError as error:  # capture refused: fn synchronised or read memory back
        print(f"graph_us: not capturable ({str(error).splitlines()[0][:120]})", flush=True)
        torch.cuda.synchronize(device)
        return None
    return float(ms) * 1e3


def time_ms_fixed(
    fn: Callable[[], Any], *, device: torch.device | str, warmup: int = 3, runs: int = 20
) -> float:
    """Median milliseconds of `runs` calls of `fn()` after `warmup` calls: a fixed count, as code
    with collectives inside needs (every rank must make the same calls). CUDA events on CUDA,
    wall clock elsewhere."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _wall_clock_median_ms(fn, warmup_ms, rep_ms, grad_to_none, min_runs=3, max_runs=100):
    def run() -> float:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    spent = run()  # the first run is always a warm-up
    while spent < warmup_ms:
        spent += run()
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < rep_ms):
        times.append(run())
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Memory


@dataclasses.dataclass(frozen=True)
class CudaMemory:
    """Allocator counters around one call, relative to what was allocated before it."""

    peak_bytes: int  # max allocated during the call, minus allocated before
    retained_bytes: int  # allocated right after the call (its result still alive), minus before


def cuda_memory(fn: Callable[[], Any], device: torch.device | str) -> CudaMemory | None:
    """Peak and retained bytes of one call of `fn` on a CUDA device; None on other devices.

    Retained bytes include whatever `fn` returns (for a forward: the output and the autograd graph
    with everything it keeps, also tensors stored as plain attributes of an autograd ctx).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    memory = CudaMemory(
        peak_bytes=torch.cuda.max_memory_allocated(device) - before,
        retained_bytes=torch.cuda.memory_allocated(device) - before,
    )
    del result
    return memory


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes that autograd keeps for backward while `fn()` runs a forward.

    Every tensor packed by autograd (`torch.autograd.graph.saved_tensors_hooks`, which also sees
    `ctx.save_for_backward`) is counted with the size of its whole storage, once per storage.
    Storages of `exclude` (e.g. parameters and the input) are not counted. Tensors an autograd
    Function keeps as plain ctx attributes are invisible here; `cuda_memory` sees them.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}  # storage data_ptr -> storage bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(kept.values())


# ---------------------------------------------------------------------------------------------
# Reference throughput


@functools.cache
def dense_gemm_tflops(flops: float, dtype: torch.dtype, device: torch.device | str) -> float:
    """TFLOP/s of one dense GEMM (cuBLAS on CUDA) with about `flops` FLOPs, square-ish shape.

    M = N = K rounded to multiples of 64, K then adjusted so 2*M*N*K is close to `flops`. A
    kernel's "fraction of dense GEMM" is its model TFLOP/s divided by this.
    """
    device = torch.device(device)
    n = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    k = max(64, round(flops / (2 * n * n) / 64) * 64)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, k, dtype=dtype, device=device, generator=generator)  # [M, K]
    b = torch.randn(k, n, dtype=dtype, device=device, generator=generator)  # [K, N]
    ms = time_ms(lambda: torch.mm(a, b), device=device)
    return 2 * n * n * k / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# Results, tables, plots


def results_path(name: str, env: dict[str, Any], out_dir: str | Path = RESULTS_DIR) -> Path:
    return Path(out_dir) / f"{name}-{gpu_slug(env['gpu'])}.json"


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    env: dict[str, Any],
    out_dir: str | Path = RESULTS_DIR,
) -> Path:
    """Write `{"benchmark", "env", "rows"}` to `<out_dir>/<name>-<gpu slug>.json` (atomically)."""
    path = results_path(name, env, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"benchmark": name, "env": env, "rows": list(rows)}
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


class RowPrinter:
    """Prints the column header at once, then each row as it is measured, in fixed widths."""

    def __init__(self, columns: Sequence[str], widths: dict[str, int] | None = None):
        """`widths`: the widest value of a column, where it is wider than 9 or its name."""
        self.columns = columns
        self.widths = [max(len(c), 9, (widths or {}).get(c, 0)) for c in columns]
        print("  ".join(c.rjust(w) for c, w in zip(columns, self.widths, strict=True)), flush=True)

    def __call__(self, row: dict[str, Any]) -> None:
        cells = [format_value(row.get(c)) for c in self.columns]
        print("  ".join(v.rjust(w) for v, w in zip(cells, self.widths, strict=True)), flush=True)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print `rows` as an aligned plain-text table of `columns` (missing values show as "-")."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as a GitHub markdown table of `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    x: Sequence[str],
    series: str,
    metrics: Sequence[str],
    title: str = "",
) -> Path | None:
    """Grouped bar chart, one panel per metric: x groups by the `x` columns, bars by `series`.

    Metrics with no numeric value are left out. Without matplotlib, prints a note and returns None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, not plotting {path} (pip install -e '.[bench]')")
        return None

    def number(row, metric):
        value = row.get(metric)
        return value if isinstance(value, int | float) else None

    metrics = [m for m in metrics if any(number(r, m) is not None for r in rows)]
    if not metrics:
        return None
    groups = list(dict.fromkeys(tuple(r[c] for c in x) for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(max(6.0, 0.9 * len(groups) * (1 + 0.2 * len(names))), 3 * len(metrics)),
        squeeze=False,
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        for i, name in enumerate(names):
            values = {tuple(r[c] for c in x): number(r, metric) for r in rows if r[series] == name}
            heights = [values.get(g) for g in groups]
            positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(
                positions,
                [h if h is not None else float("nan") for h in heights],
                width,
                label=name,
            )
        ax.set_xticks(range(len(groups)), ["\n".join(map(str, g)) for g in groups], fontsize=8)
        ax.set_ylabel(metric)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    path: Path | None,
    *,
    table: bool = True,
    **plot_args: Any,
) -> None:
    """Print the table (unless `table=False`, when a RowPrinter showed the rows already) and
    where the results went; plot beside them unless plot_args is empty."""
    if table:
        print_table(rows, columns)
    if not rows or path is None:
        return
    print(f"\nwrote {path}")
    if plot_args:
        png = plot(rows, Path(path).with_suffix(".png"), **plot_args)
        if png:
            print(f"wrote {png}")
