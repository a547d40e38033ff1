"""Baseline MoE MLPs with the signature of `moeblaze.moe_mlp(x, topk_ids, topk_weights, w13, w2)`.

# T tokens, d hidden, F expert ffn, E experts, k top-k, S = T*k slots (slot s = t*k + j)

- `dense_dispatch_moe_mlp`: the path of Hugging Face "grouped_mm" experts and torchtitan.
  Stable sort of slots by expert -> gather x into a permuted [S, d] dispatch buffer ->
  grouped GEMM (gate/up) -> SwiGLU (or the given activation) -> grouped GEMM (down) -> scale by
  the routing weights -> scatter-add into [T, d]. Autograd keeps the [S, d] buffer and the
  [S, 2F] / [S, F] intermediates for backward, which is the memory moeblaze is built to avoid.
- `loop_moe_mlp`: the per-expert loop (Hugging Face "eager"), i.e. `moeblaze.moe_mlp_reference`.
"""

import torch

import moeblaze
from moeblaze.activation import SWIGLU

# torch._grouped_mm (torch 2.13) runs on CUDA (bf16; Hopper fast path) and on CPU for float32 and
# bfloat16, provided every row stride of its operands is a multiple of 16 bytes; it rejects
# float64. Where it cannot run, `grouped_mm` below loops over the experts with torch.mm on the
# SAME permuted buffer, so the baseline keeps the memory behaviour of the dense-dispatch path.
_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def loop_moe_mlp(x, topk_ids, topk_weights, w13, w2, activation=SWIGLU):
    """Per-expert loop (Hugging Face "eager"): the moeblaze reference."""
    return moeblaze.moe_mlp_reference(x, topk_ids, topk_weights, w13, w2, activation)


def dense_dispatch_moe_mlp(x, topk_ids, topk_weights, w13, w2, activation=SWIGLU):
    """MoE MLP through a permuted dispatch buffer and grouped GEMMs.

    x [T, d], topk_ids [T, k] integer, topk_weights [T, k], w13 [E, 2F, d] ([E, F, d] for an
    ungated `activation`), w2 [E, d, F] -> [T, d]; `activation` a moeblaze activation, applied
    with torch ops (SwiGLU: silu(gate) * up).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)  # [S]
    order = torch.sort(flat_ids, stable=True).indices  # [S] slot ids grouped by expert
    token_of = order // top_k  # [S] token of each sorted slot
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end of each expert's rows

    x_sorted = x.index_select(0, token_of)  # [S, d] the dispatch buffer
    h = grouped_mm(x_sorted, w13.transpose(1, 2), offsets)  # [S, 2F]
    a = activation.apply(h)  # [S, F]
    y = grouped_mm(a, w2.transpose(1, 2), offsets)  # [S, d]
    y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)  # [S, d]
    # The combine accumulates in x.dtype, as the Hugging Face / torchtitan baselines do.
    out = torch.zeros(num_tokens, x.shape[1], dtype=y.dtype, device=x.device)  # [T, d]
    return out.index_add_(0, token_of, y)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of a [S, K] times b[e] [K, N] -> [S, N] (offsets int32 [E])."""
    if _grouped_mm_runs(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    ends = offsets.tolist()  # one device-to-host sync, fallback path only
    starts = [0, *ends[:-1]]
    return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])


def _grouped_mm_runs(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or a.dtype not in _GROUPED_MM_DTYPES:
        return False
    if a.device.type == "cuda" and a.dtype != torch.bfloat16:
        return False  # the CUDA grouped GEMM is documented for bf16 only
    align = 16 // a.element_size()
    return all(n % align == 0 for n in (a.shape[1], b.shape[-1], b.shape[-2]))
