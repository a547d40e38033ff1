"""The experts' gated activation: SwiGLU, and the clamped and quick-GELU forms of it.

    gate' = min(gate, limit),  up' = clamp(up, -limit, limit)      (no clamp when limit is None)
    act   = gate' * sigmoid(alpha * gate') * (up' + up_offset)

    SwiGLU()                                    silu(gate) * up   (Mixtral, Qwen, DeepSeek-V3, ...)
    SwiGLU(limit=10.0)                          DeepSeek-V4
    SwiGLU(alpha=1.702, limit=7.0, up_offset=1) Megatron's quick_gelu GLU with glu_linear_offset
                                                and activation_func_clamp_value
    SwiGLU(alpha=1.702, limit=7.0, up_offset=1, interleaved=True)   GPT-OSS

`interleaved` is where the two halves sit in the 2F pre-activation (the rows of w13 and of its
bias): all gate values then all up values (`split` is `chunk(2)`; the default, the Hugging Face
"concatenated" layout), or alternating gate0, up0, gate1, up1, ... (GPT-OSS's gate_up_proj).

The kernels take the four fields as compile-time constants (moeblaze.kernels.expert_mlp), so
plain SwiGLU builds exactly the code it always did. `forward` and `backward` here are the same
computation in torch, what the torch backend (moeblaze.reference.TorchStages), the oracle
(moe_mlp_reference) and the dense SwiGLUMLP run.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class SwiGLU:
    """act = gate' * sigmoid(alpha * gate') * (up' + up_offset), with gate' = min(gate, limit)
    and up' = clamp(up, -limit, limit) when `limit` is set (see the module docstring).

    Args:
        alpha: the sigmoid's slope: 1.0 is SiLU (Swish), 1.702 the quick GELU of GPT-OSS.
        limit: clamp gate from above and up on both sides at this value (> 0), or None.
        up_offset: added to the (clamped) up half: 1.0 in GPT-OSS.
        interleaved: the 2F pre-activation columns (w13's rows) alternate gate, up, gate, ...
            instead of holding all gate columns, then all up columns (see `split`).

    Gradients follow torch's: zero for a gate above `limit` and an up outside [-limit, limit].
    """

    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    interleaved: bool = False

    def __post_init__(self):
        for name in ("alpha", "up_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"SwiGLU {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"SwiGLU {name}={value!r} must be finite")
            object.__setattr__(self, name, float(value))
        if self.alpha <= 0:
            raise ValueError(f"SwiGLU alpha={self.alpha!r} must be > 0")
        if self.limit is not None:
            if isinstance(self.limit, bool) or not isinstance(self.limit, int | float):
                raise TypeError(f"SwiGLU limit must be a number or None, got {self.limit!r}")
            if not 0 < self.limit < math.inf:
                raise ValueError(f"SwiGLU limit={self.limit!r} must be a finite number > 0")
            object.__setattr__(self, "limit", float(self.limit))
        if not isinstance(self.interleaved, bool):
            raise TypeError(f"SwiGLU interleaved must be a bool, got {self.interleaved!r}")

    def split(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) [..., F], the halves of a pre-activation [..., 2F] (views)."""
        if self.interleaved:
            return pre[..., 0::2], pre[..., 1::2]
        return pre.chunk(2, dim=-1)

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The [..., 2F] tensor whose `split` is (gate, up): e.g. the pre-activation's gradient
        from (d_gate, d_up)."""
        if self.interleaved:
            return torch.stack([gate, up], dim=-1).flatten(-2)
        return torch.cat([gate, up], dim=-1)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act from the two halves of the pre-activation, in their dtype (differentiable;
        plain SwiGLU is exactly `F.silu(gate) * up`)."""
        gate, up = self._clamp(gate, up)
        glu = F.silu(gate) if self.alpha == 1.0 else gate * torch.sigmoid(self.alpha * gate)
        return glu * (up + self.up_offset if self.up_offset else up)

    def backward(self, gate: torch.Tensor, up: torch.Tensor, d_act: torch.Tensor):
        """(d_gate, d_up) from the pre-activation halves and the gradient of act (fp32)."""
        gate_c, up_c = self._clamp(gate, up)
        sig = torch.sigmoid(self.alpha * gate_c)
        d_up = d_act * gate_c * sig
        d_gate = d_act * (up_c + self.up_offset) * sig * (1 + self.alpha * gate_c * (1 - sig))
        if self.limit is not None:
            d_gate = torch.where(gate <= self.limit, d_gate, 0.0)
            d_up = torch.where((up >= -self.limit) & (up <= self.limit), d_up, 0.0)
        return d_gate, d_up

    def _clamp(self, gate, up):
        if self.limit is None:
            return gate, up
        return gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)

    @property
    def constants(self) -> tuple[float, float | None, float, bool]:
        """(alpha, limit, up_offset, interleaved): how the ops and kernels take it."""
        return self.alpha, self.limit, self.up_offset, self.interleaved

    def __repr__(self) -> str:
        fields = dataclasses.fields(self)
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields
            if getattr(self, f.name) != f.default
        ]
        return f"SwiGLU({', '.join(changed)})"


SWIGLU = SwiGLU()
