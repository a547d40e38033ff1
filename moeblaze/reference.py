"""Plain-torch reference of `moe_mlp`: a loop over experts (Hugging Face "eager" semantics).

# T tokens, d hidden, F ffn, E experts, k top-k

The test oracle (run it in float64), and a readable statement of what the kernels compute. It
gathers each expert's tokens into a copy, so it is neither fast nor lean.
"""

import torch
import torch.nn.functional as F


def moe_mlp_reference(
    x: torch.Tensor,  # [T, d]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    w13: torch.Tensor,  # [E, 2F, d]
    w2: torch.Tensor,  # [E, d, F]
) -> torch.Tensor:  # [T, d]
    """out[t] = sum_j topk_weights[t, j] * w2[e] @ swiglu(w13[e] @ x[t]), e = topk_ids[t, j]."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, choice = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])  # [n_e, d]
        out = out.index_add(0, token, y * topk_weights[token, choice, None].to(y.dtype))
    return out
