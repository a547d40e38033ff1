"""CPU runs of bench.hf_model (a training step of a small Hugging Face MoE model per experts
implementation), eager and under torch.compile, as the GPU step of bench/run_gpu.sh runs it."""

import json

import pytest

import moeblaze

pytest.importorskip("transformers", minversion="5")
from bench import hf_model  # noqa: E402


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_hf_model_bench_runs_every_provider_on_cpu(backend, tmp_path):
    # Every default provider steps the `tiny` model, moeblaze keeping fewer bytes for backward
    # than grouped_mm's dense dispatch; the rows are written as they come (a compiled run to its
    # own file, compiled once outside the timed calls: aot_eager runs AOTAutograd and the ops'
    # fake implementations, quickly). moeblaze's torch stages run (as on a CPU without
    # TRITON_INTERPRET, which the test setup sets): the interpreter would take minutes.
    argv = ["--configs", "tiny", "--rep-ms", "1", "--out", str(tmp_path)]
    with moeblaze.use_backend("torch"):
        rows = hf_model.main(argv + ([] if backend is None else ["--compile", backend]))
    assert [r["provider"] for r in rows] == list(hf_model.DEFAULT_PROVIDERS)
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["tokens/s"] > 0 and row["saved_MiB"] > 0, row
        assert row["compile"] == backend
    saved = {r["provider"]: r["saved_MiB"] for r in rows}
    assert saved["moeblaze-up_proj"] < saved["moeblaze"] < saved["grouped_mm"], saved
    speedups = {r["provider"]: r["speedup_vs_grouped_mm"] for r in rows}
    assert speedups["grouped_mm"] == 1
    name = "hf_model" if backend is None else f"hf_model_{backend}"
    written = json.loads((tmp_path / f"{name}-cpu.json").read_text())
    assert written["rows"] == rows
