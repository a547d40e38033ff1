"""A training step of a small Hugging Face MoE model, per experts implementation.

# B batch, L sequence, T = B*L tokens, d hidden, F expert ffn, E experts, k top-k

    AutoModelForCausalLM.from_config(config)  (random weights, no download)
    for provider in eager, grouped_mm, moeblaze[-policy]:
        model.set_experts_implementation(provider)
        step = model(input_ids, labels=input_ids).loss.backward()

One row per config and provider, measured in one run on the same model and tokens (bf16 on
CUDA, float32 on CPU):
  ms                    median time of one forward+backward step (do_bench on CUDA, wall clock
                        on CPU), gradients set to None before every step
  tokens/s              T / time
  peak_mem_MiB          peak allocated during one step, above what was allocated before (CUDA)
  saved_MiB             bytes autograd keeps for backward after a forward, excluding the
                        parameters: attention and norms are the same for every provider, the
                        difference is what the experts keep
  speedup_vs_grouped_mm grouped_mm ms / ms, same config (and compile backend)

With `--compile BACKEND` the model runs under torch.compile(model, backend=BACKEND) (e.g.
inductor), compiled once per provider before the timing (the experts implementation is part of
what dynamo guards on); the `compile` column names the backend, and the results go to
hf_model_<BACKEND>-<gpu>.json.

On CPU (the `tiny` config) moeblaze runs its torch implementation of the kernel stages unless
TRITON_INTERPRET=1; the CPU numbers show that the benchmark works, not how fast anything is.

    python -m bench.hf_model                      # model configs on CUDA, `tiny` on CPU
    python -m bench.hf_model --configs olmoe-4l --providers grouped_mm,moeblaze
    python -m bench.hf_model --configs gpt-oss-20b-4l   # GPT-OSS's experts (biases, interleaved)
    python -m bench.hf_model --configs gemma4-ish-4l    # GeGLU experts beside a dense MLP
    python -m bench.hf_model --configs olmoe-4l --compile inductor
    nsys profile -t cuda,nvtx -o hf_model python -m bench.hf_model --configs olmoe-4l
"""

import argparse
import contextlib
import dataclasses
import sys
import traceback

import torch
import transformers

import moeblaze.integrations.huggingface as moeblaze_hf
from bench import harness
from bench.moe_layer import add_speedups, parse_list


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str  # the "shape" column
    family: str  # transformers config class
    batch: int
    seq: int
    fields: dict  # the config's fields

    def build(self):
        return getattr(transformers, self.family)(**self.fields)


def _attention(d, heads, kv_heads, layers, vocab):
    return dict(
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


CONFIGS = {
    c.name: c
    for c in [
        ModelConfig(
            "tiny",
            "MixtralConfig",
            batch=2,
            seq=64,
            fields=dict(
                intermediate_size=96,
                num_local_experts=8,
                num_experts_per_tok=2,
                **_attention(128, 4, 2, 2, 512),
            ),
        ),
        # The first 4 of OLMoE-1B-7B's 16 layers: d=2048, F=1024, E=64, k=8.
        ModelConfig(
            "olmoe-4l",
            "OlmoeConfig",
            batch=4,
            seq=2048,
            fields=dict(
                intermediate_size=1024,
                num_experts=64,
                num_experts_per_tok=8,
                **_attention(2048, 16, 16, 4, 50304),
            ),
        ),
        # 4 of Qwen3-30B-A3B's 48 layers: d=2048, F=768, E=128, k=8 (vocab cut to 32k).
        ModelConfig(
            "qwen3-30b-a3b-4l",
            "Qwen3MoeConfig",
            batch=4,
            seq=2048,
            fields=dict(
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_experts=128,
                num_experts_per_tok=8,
                head_dim=128,
                **_attention(2048, 32, 4, 4, 32000),
            ),
        ),
        # 4 of GPT-OSS-20B's 24 layers: d=2880, F=2880, E=32, k=4; gate and up interleaved,
        # biases, clamped quick-GELU SwiGLU (vocab cut to 32k). Named only (--configs).
        ModelConfig(
            "gpt-oss-20b-4l",
            "GptOssConfig",
            batch=4,
            seq=2048,
            fields=dict(
                intermediate_size=2880,
                num_local_experts=32,
                num_experts_per_tok=4,
                head_dim=64,
                **_attention(2880, 64, 8, 4, 32000),
            ),
        ),
        # 4 layers of a Gemma-4-26B-A4B-like model: GeGLU experts (moeblaze.Gated, GELU's tanh
        # form) with d=2816, F=704, E=128, k=8 beside a dense MLP in every layer (the model
        # card's sizes, not checked against the weights); full attention, no per-layer inputs
        # (vocab cut to 32k). Named only (--configs).
        ModelConfig(
            "gemma4-ish-4l",
            "Gemma4TextConfig",
            batch=4,
            seq=2048,
            fields=dict(
                intermediate_size=2112,
                moe_intermediate_size=704,
                num_experts=128,
                top_k_experts=8,
                enable_moe_block=True,
                head_dim=256,
                layer_types=["full_attention"] * 4,
                hidden_size_per_layer_input=0,
                **_attention(2816, 16, 8, 4, 32000),
            ),
        ),
    ]
}
GPU_CONFIGS = ("olmoe-4l", "qwen3-30b-a3b-4l")
CPU_CONFIGS = ("tiny",)
PROVIDERS = ("eager", "grouped_mm", *moeblaze_hf.IMPLEMENTATIONS)
DEFAULT_PROVIDERS = ("eager", "grouped_mm", "moeblaze", "moeblaze-up_proj")
COLUMNS = (
    "shape",
    "provider",
    "compile",
    "ms",
    "tokens/s",
    "peak_mem_MiB",
    "saved_MiB",
    "speedup_vs_grouped_mm",
)


def bench_provider(model, config, provider, input_ids, device, rep_ms, backend=None) -> dict:
    """One row; a provider that fails gets a row with `error` and the run goes on. `backend`: a
    torch.compile backend to run the model under, or None (eager)."""
    row = {
        "shape": config.name,
        "mode": "fwd+bwd",
        "provider": provider,
        "compile": backend,
        "tokens": input_ids.numel(),
        "dtype": str(next(model.parameters()).dtype),
    }
    params = list(model.parameters())
    runner = model if backend is None else torch.compile(model, backend=backend)
    try:
        model.set_experts_implementation(provider)

        def loss():
            return runner(input_ids=input_ids, labels=input_ids).loss

        def step():
            loss().backward()

        if backend is not None:
            step()  # compiled here, not in the timed calls
        saved = harness.saved_tensor_bytes(loss, exclude=params)
        range_name = f"bench {config.name} {provider}"
        nvtx = (
            torch.cuda.nvtx.range(range_name) if device.type == "cuda" else contextlib.nullcontext()
        )
        with nvtx:
            ms = harness.time_ms(step, device=device, rep_ms=rep_ms, grad_to_none=params)
        for p in params:
            p.grad = None
        memory = harness.cuda_memory(step, device)
    except Exception as error:  # e.g. out of memory for the per-expert loop: report, go on
        print(f"{config.name} {provider}: FAILED", file=sys.stderr)
        traceback.print_exception(error, limit=-3, file=sys.stderr)
        return dict(row, error=f"{type(error).__name__}: {error}"[:300])
    finally:
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(ms=ms, saved_MiB=saved / harness.MIB)
    row["tokens/s"] = input_ids.numel() / (ms * 1e-3)
    row["peak_mem_MiB"] = memory.peak_bytes / harness.MIB if memory else None
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        help=f"comma list of {list(CONFIGS)}; "
        f"default {','.join(GPU_CONFIGS)} on CUDA, {','.join(CPU_CONFIGS)} on CPU",
    )
    parser.add_argument(
        "--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma list of {list(PROVIDERS)}"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="results directory")
    parser.add_argument("--rep-ms", type=float, default=200, help="timed time per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        metavar="BACKEND",
        help="run the model under torch.compile with this backend (e.g. inductor)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else harness.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_configs = ",".join(GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
    configs = [CONFIGS[c] for c in parse_list(args.configs or default_configs, CONFIGS, "configs")]
    providers = parse_list(args.providers, PROVIDERS, "providers")

    env = harness.environment(device)
    env["transformers"] = transformers.__version__
    print(
        f"# hf_model on {env['gpu']}: torch {env['torch']}, transformers "
        f"{env['transformers']}, triton {env['triton']}, commit {env['commit']}, {dtype}, "
        f"compile {args.compile}",
        flush=True,
    )
    # A compiled run writes beside the eager one (hf_model_<backend>-<gpu>.json).
    name = "hf_model" if args.compile is None else f"hf_model_{args.compile}"
    rows: list[dict] = []
    for config in configs:
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(config.build())
        model = model.to(device=device, dtype=dtype).train()
        g = torch.Generator(device=device).manual_seed(args.seed)
        vocab = config.fields["vocab_size"]
        input_ids = torch.randint(0, vocab, (config.batch, config.seq), device=device, generator=g)
        for provider in providers:
            row = bench_provider(
                model, config, provider, input_ids, device, args.rep_ms, args.compile
            )
            rows.append(row)
            add_speedups(rows)
            path = harness.write_results(name, rows, env, args.out)  # after every provider
            print("  ".join(harness.format_value(rows[-1].get(c)) for c in COLUMNS), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    harness.report(rows, COLUMNS, path if rows else None)
    return rows


if __name__ == "__main__":
    main()
