#!/usr/bin/env bash
# GPU tests and benchmarks in one bounded run (each step has a time limit; the seven default
# steps together take at most about 22 minutes), for a CUDA machine.
#
#   bash bench/run_gpu.sh OUTDIR [STEP ...]
#
# STEPs (default: all but tune_expert, in this order): pytest-gpu moe_layer routing_plan ep_combine
# overlap csrc_kernels hf_model; tune_expert (the tile-config sweep of the expert kernels at BLOCK_M=128,
# up to about 9 minutes), tune_backward (the same for grad_act, grad_w13 and grad_w2 on
# qwen3-30b-a3b and mixtral only, grad_act's epilogue widths among them, to OUTDIR/tune_backward),
# tune_scatter (the same for down_combine and grad_input on qwen3-30b-a3b and deepseek-ish, to
# OUTDIR/tune_scatter),
# tune_gpt_oss (gate_up and grad_act with GPT-OSS's interleaved SwiGLU
# at its shape, to OUTDIR/tune_gpt_oss), tune_inkling2 (the same with Inkling 2's soft-capped
# SwiGLU at both tile heights, to OUTDIR/tune_inkling2), overlap_tiles (the fused GEMM's tile configs at W=8, M=8192, to
# OUTDIR/overlap_tiles), overlap_link (every mode at W=8 with links emulated at 450 GB/s, to
# OUTDIR/overlap_link), kernel_profile (Nsight Compute counters of every kernel of a MoE step
# and of the fused GEMM, to OUTDIR/kernel_profile), grad_act_profile (ncu's full section set,
# stall reasons included, of grad_act_kernel in a qwen3-30b-a3b step, to
# OUTDIR/grad_act_profile), routing_profile (ncu's full section set of the compiled router top-k
# and routing plan kernels at T=16384, E=128, k=8, to OUTDIR/routing_profile), moe_deterministic
# (moe_mlp with deterministic=True beside the default, fwd+bwd, to OUTDIR/moe_deterministic) and
# moe_activations (the GeGLU, ReLU² and soft-capped SwiGLU shapes of bench.moe_layer, fwd+bwd,
# against grouped_mm, to OUTDIR/moe_activations) and hf_model_compile (bench.hf_model under
# torch.compile with inductor, to OUTDIR/hf_model_inductor-<gpu>.json) run only when named.
# Naming some splits the run, e.g. into `pytest-gpu` and `moe_layer routing_plan overlap
# csrc_kernels` on a machine that limits one command to 10 minutes.
#
# Writes to OUTDIR: env.txt, pytest-gpu.txt, moe_layer.txt, routing_plan.txt, ep_combine.txt, overlap.txt,
# csrc_kernels.txt, hf_model.txt, tune_expert.txt, tune_backward.txt, tune_scatter.txt, tune_gpt_oss.txt, tune_inkling2.txt,
# overlap_tiles.txt, overlap_link.txt,
# kernel_profile.txt, grad_act_profile.txt, routing_profile.txt, moe_deterministic.txt, moe_activations.txt, hf_model_compile.txt (logs), the result
# JSON / PNG files of each benchmark, and exit_codes.txt. A failing or timed-out step is recorded
# and the next one still runs; the script exits non-zero if any step failed.
set -euo pipefail
OUT=${1:?usage: bash bench/run_gpu.sh OUTDIR [STEP ...]}
shift
STEPS=" ${*:-pytest-gpu moe_layer routing_plan ep_combine overlap csrc_kernels hf_model} "
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Install only if moeblaze is not importable from outside the checkout. The GPU machine may have
# no internet: use the torch and triton already installed there.
if ! (cd / && python -c "import moeblaze") 2>/dev/null; then
    python -m pip install --no-deps --no-build-isolation -e . >"$OUT/pip-install.txt" 2>&1
fi

{
    nvidia-smi || true
    python -c "import json; from bench.harness import environment; print(json.dumps(environment(), indent=2))"
    python -c "import json; from kernelbase.compiled import status; print(json.dumps(status(), indent=2))"
} >"$OUT/env.txt" 2>&1 || true

: >"$OUT/exit_codes.txt"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.txt, record rc
    local name=$1 seconds=$2 rc=0
    shift 2
    if [[ "$STEPS" != *" $name "* ]]; then return; fi
    echo "== $name (limit ${seconds}s): $*"
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt" || rc=$?
    echo "$name $rc" >>"$OUT/exit_codes.txt"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

step pytest-gpu 480 python -m pytest -m gpu -q
step moe_layer 260 python -m bench.moe_layer --out "$OUT"
step routing_plan 40 python -m bench.routing_plan --out "$OUT"
step ep_combine 40 python -m bench.ep_combine --out "$OUT"
step overlap 110 python -m bench.overlap --out "$OUT"
step csrc_kernels 200 python -m bench.csrc_kernels --out "$OUT"
step hf_model 200 python -m bench.hf_model --out "$OUT"
# BLOCK_M=128 only: the plan's block_m at T=16384 for every bench shape (moe_layer's).
step tune_expert 540 python -m bench.tune_expert --block-ms 128 --out "$OUT"
step tune_backward 400 python -m bench.tune_expert --shapes qwen3-30b-a3b,mixtral \
    --stages grad_act,grad_w13,grad_w2 --block-ms 128 --out "$OUT/tune_backward"
# scatter_rows (the down projection's atomic combine, the input gradient) where its K is short:
# qwen3-30b-a3b's down_combine ran at 0.43 of cuBLAS, one CTA per SM with its atomics after a
# 12-step main loop; the 128x128x64 w8 s3 candidate fits two CTAs per SM.
step tune_scatter 300 python -m bench.tune_expert --shapes qwen3-30b-a3b,deepseek-ish \
    --stages down_combine,grad_input --block-ms 128 --out "$OUT/tune_scatter"
step tune_gpt_oss 200 python -m bench.tune_expert --shapes gpt-oss-20b --stages gate_up,grad_act \
    --activation gpt-oss --block-ms 128 --out "$OUT/tune_gpt_oss"
step tune_inkling2 240 python -m bench.tune_expert --shapes inkling2-ish --stages gate_up,grad_act \
    --activation inkling2 --block-ms 64,128 --out "$OUT/tune_inkling2"
step overlap_tiles 300 python -m bench.overlap --world-sizes 8 --ms 8192 \
    --tiles 128x256x64:8:3,128x256x64:8:3:ptr,128x256x64:8:4,128x128x64:8:4,128x128x64:8:4:ptr \
    --out "$OUT/overlap_tiles"
step overlap_link 300 python -m bench.overlap --world-sizes 8 --emulate-link 450 \
    --out "$OUT/overlap_link"
step kernel_profile 400 python -m bench.kernel_profile --out "$OUT/kernel_profile"
step grad_act_profile 300 python -m bench.kernel_profile --workloads moe:qwen3-30b-a3b \
    --kernel-regex grad_act --full --out "$OUT/grad_act_profile"
step routing_profile 150 python -m bench.kernel_profile --workloads routing --full \
    --out "$OUT/routing_profile"
step moe_deterministic 150 python -m bench.moe_layer --modes fwd+bwd --no-breakdown \
    --providers moeblaze-activation,moeblaze-deterministic --out "$OUT/moe_deterministic"
step moe_activations 240 python -m bench.moe_layer --shapes gemma4-ish,nemotron3-nano-ish,inkling2-ish \
    --modes fwd+bwd --providers moeblaze-activation,moeblaze-up_proj,grouped_mm \
    --out "$OUT/moe_activations"
step hf_model_compile 400 python -m bench.hf_model --compile inductor --out "$OUT"

cat "$OUT/exit_codes.txt"
exit "$status"
