"""The experts' activation: SwiGLU (gated), its clamped and quick-GELU forms, Gated (a GLU with
another gate function: GeGLU, ReGLU) and Ungated.

    gate' = min(gate, limit),  up' = clamp(up, -limit, limit)      (no clamp when limit is None)
    act   = gate' * sigmoid(alpha * gate') * (up' + up_offset)      SwiGLU
    act   = fn(gate') * (up' + up_offset)                           Gated(fn)

    soft caps, cap_c(y) = c * tanh(y / c) (none when c is None):
    act   = cap_g(gate') * sigmoid(alpha * gate') * (cap_u(up') + up_offset)
                                                    SwiGLU(gate_softcap=g, up_softcap=u)
    act   = fn(gate') * (cap_u(up') + up_offset)    Gated(fn, up_softcap=u)

    SwiGLU()                                    silu(gate) * up   (Mixtral, Qwen, DeepSeek-V3, ...)
    SwiGLU(limit=10.0)                          DeepSeek-V4
    SwiGLU(alpha=1.702, limit=7.0, up_offset=1) Megatron's quick_gelu GLU with glu_linear_offset
                                                and activation_func_clamp_value
    SwiGLU(alpha=1.702, limit=7.0, up_offset=1, interleaved=True)   GPT-OSS
    Gated("gelu_tanh")                          gelu(gate, approximate="tanh") * up   (Gemma 4)
    Gated("gelu")                               Megatron's GLU with F.gelu
    SwiGLU(gate_softcap=4.0, up_softcap=25.0)   Inkling 2 (the sigmoid sees the uncapped gate)

`interleaved` is where the two halves sit in the 2F pre-activation (the rows of w13 and of its
bias): all gate values then all up values (`split` is `chunk(2)`; the default, the Hugging Face
"concatenated" layout), or alternating gate0, up0, gate1, up1, ... (GPT-OSS's gate_up_proj).

Experts without a gate (`Ungated`) compute act = fn(h) of an F-wide pre-activation (w13 then
holds F rows, not 2F):

    Ungated("relu2")      relu(h)^2     (NemotronH, Nemotron 3; Megatron's squared_relu)
    Ungated("gelu")       F.gelu(h)     (Megatron's default MLP, gated_linear_unit=False)
    Ungated("gelu_tanh")  F.gelu(h, approximate="tanh")
    Ungated("relu"), Ungated("silu")

All three classes say how wide the pre-activation is (`pre_width`, `ffn`), compute act from it
and its gradient (`apply`, `grad`), and give the ops and kernels their `constants` (kind, alpha,
limit, up_offset, interleaved, gate_softcap, up_softcap), compile-time constants of the kernels
(moeblaze.kernels.expert_mlp), so plain SwiGLU builds exactly the code it always did;
`activation_of` turns the constants back into the activation. The torch computations here are
what the torch backend (moeblaze.reference.TorchStages), the oracle (moe_mlp_reference) and the
dense SwiGLUMLP run.
"""

import dataclasses
import functools
import math
import weakref
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

# The gradient of a gate or up value exactly at `limit`: passed or stopped as torch.clamp (with a
# number as bound) does on the torch installed, so that the backward of the kernels and of the
# torch stages is autograd's gradient of `forward`, as the Hugging Face and Megatron forms' is on
# that torch: passed (subgradient 1) up to torch 2.13; torch 2.14 gives clamp the minimum-norm
# subgradient, 0. (Read from the version, not from autograd at import: moeblaze may be imported
# under a FakeTensorMode, as when a model is built for memory estimation.)
CLAMP_GRAD_AT_LIMIT = torch.torch_version.TorchVersion(torch.__version__) < "2.14"


class _GatedUnit:
    """What SwiGLU and Gated share: a pre-activation [..., 2F] of gate and up halves (laid out
    as `interleaved` says), the clamps of `limit`, the `up_softcap` and `up_offset`, and
    act = gate_fn(gate') * (cap_u(up') + up_offset); the subclasses give gate_fn (`_gate`, and
    `_gate_and_slope` for the backward)."""

    gated: ClassVar[bool] = True

    def _check_fields(self, *numbers: str) -> None:
        name = type(self).__name__
        for field in (*numbers, "up_offset"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} {field} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} {field}={value!r} must be finite")
            object.__setattr__(self, field, float(value))
        for field in ("limit", "gate_softcap", "up_softcap"):
            value = getattr(self, field, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} {field} must be a number or None, got {value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"{name} {field}={value!r} must be a finite number > 0")
            object.__setattr__(self, field, float(value))
        if not isinstance(self.interleaved, bool):
            raise TypeError(f"{name} interleaved must be a bool, got {self.interleaved!r}")

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
        up = _softcap(up, self.up_softcap)
        return self._gate(gate) * (up + self.up_offset if self.up_offset else up)

    def backward(self, gate: torch.Tensor, up: torch.Tensor, d_act: torch.Tensor):
        """(d_gate, d_up) from the pre-activation halves and the gradient of act (fp32)."""
        gate_c, up_c = self._clamp(gate, up)
        glu, slope = self._gate_and_slope(gate_c)
        up_c, up_slope = _softcap_and_slope(up_c, self.up_softcap)
        d_up = d_act * glu * up_slope
        d_gate = d_act * (up_c + self.up_offset) * slope
        if self.limit is not None:
            limit = self.limit
            if CLAMP_GRAD_AT_LIMIT:
                gate_in, up_in = gate <= limit, (up >= -limit) & (up <= limit)
            else:
                gate_in, up_in = gate < limit, (up > -limit) & (up < limit)
            d_gate, d_up = torch.where(gate_in, d_gate, 0.0), torch.where(up_in, d_up, 0.0)
        return d_gate, d_up

    def _clamp(self, gate, up):
        if self.limit is None:
            return gate, up
        return gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)

    def pre_width(self, ffn: int) -> int:
        """The pre-activation's width (w13's rows) for `ffn` activation columns: 2F."""
        return 2 * ffn

    def ffn(self, pre_width: int) -> int:
        """The activation's width F of a pre-activation `pre_width` wide (2F)."""
        return pre_width // 2

    def apply(self, pre: torch.Tensor) -> torch.Tensor:
        """act [..., F] of the pre-activation [..., 2F] (`forward` of its halves)."""
        return self.forward(*self.split(pre))

    def grad(self, pre: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
        """The pre-activation's gradient [..., 2F] from act's (`backward`, joined)."""
        return self.join(*self.backward(*self.split(pre), d_act))

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


@dataclasses.dataclass(frozen=True, repr=False)
class SwiGLU(_GatedUnit):
    """act = gate' * sigmoid(alpha * gate') * (up' + up_offset), with gate' = min(gate, limit)
    and up' = clamp(up, -limit, limit) when `limit` is set, and the linear gate factor and up'
    soft-capped when `gate_softcap` / `up_softcap` are (see the module docstring).

    Args:
        alpha: the sigmoid's slope: 1.0 is SiLU (Swish), 1.702 the quick GELU of GPT-OSS.
        limit: clamp gate from above and up on both sides at this value (> 0), or None.
        up_offset: added to the (clamped, capped) up half: 1.0 in GPT-OSS.
        interleaved: the 2F pre-activation columns (w13's rows) alternate gate, up, gate, ...
            instead of holding all gate columns, then all up columns (see `split`).
        gate_softcap: the gate's linear factor is c * tanh(gate' / c) (> 0), the sigmoid's
            argument stays alpha * gate' (Inkling 2: 4.0); or None.
        up_softcap: up' becomes c * tanh(up' / c) (> 0) before the offset (Inkling 2: 25.0);
            or None.

    Gradients follow torch's: zero for a gate above `limit` and an up outside [-limit, limit];
    exactly at the limit, what torch.clamp gives on the torch installed (`CLAMP_GRAD_AT_LIMIT`:
    passed before torch 2.14, zero from it on).
    """

    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    interleaved: bool = False
    gate_softcap: float | None = None
    up_softcap: float | None = None
    fn: ClassVar[str] = "swiglu"  # the kernels' name of its gate function (ACT)

    def __post_init__(self):
        self._check_fields("alpha")
        if self.alpha <= 0:
            raise ValueError(f"SwiGLU alpha={self.alpha!r} must be > 0")

    def _gate(self, gate):
        if self.gate_softcap is None:
            return F.silu(gate) if self.alpha == 1.0 else gate * torch.sigmoid(self.alpha * gate)
        return _softcap(gate, self.gate_softcap) * torch.sigmoid(self.alpha * gate)

    def _gate_and_slope(self, gate):
        """(cap * sig, its derivative) with sig = sigmoid(alpha * gate), cap = cap_g(gate)."""
        sig = torch.sigmoid(self.alpha * gate)
        cap, cap_slope = _softcap_and_slope(gate, self.gate_softcap)
        return cap * sig, sig * (cap_slope + self.alpha * cap * (1 - sig))

    @property
    def constants(self) -> tuple[str, float, float | None, float, bool, float | None, float | None]:
        """("swiglu", alpha, limit, up_offset, interleaved, gate_softcap, up_softcap): how the
        ops and kernels take it."""
        return (
            "swiglu",
            self.alpha,
            self.limit,
            self.up_offset,
            self.interleaved,
            self.gate_softcap,
            self.up_softcap,
        )


@dataclasses.dataclass(frozen=True, repr=False)
class Gated(_GatedUnit):
    """act = fn(gate') * (up' + up_offset), the clamps and layout as SwiGLU's: a GLU whose gate
    function is one of Ungated's other than SiLU (SwiGLU's).

    Args:
        fn: "gelu" or "gelu_tanh" (GeGLU: Gemma 4's experts, Megatron's GLU with F.gelu),
            "relu" (ReGLU) or "relu2".
        limit, up_offset, interleaved, up_softcap: as SwiGLU's (Megatron's
            activation_func_clamp_value and glu_linear_offset apply to any GLU).
    """

    fn: str
    limit: float | None = None
    up_offset: float = 0.0
    interleaved: bool = False
    up_softcap: float | None = None

    def __post_init__(self):
        if self.fn == "silu":
            raise ValueError("Gated('silu') is moeblaze.SwiGLU(): use that")
        if self.fn not in GATED_FUNCTIONS:
            raise ValueError(f"Gated fn must be one of {GATED_FUNCTIONS}, got {self.fn!r}")
        self._check_fields()

    def _gate(self, gate):
        return Ungated(self.fn).apply(gate)

    def _gate_and_slope(self, gate):
        ungated = Ungated(self.fn)
        return ungated.apply(gate), ungated.slope(gate)

    @property
    def constants(self) -> tuple[str, float, float | None, float, bool, None, float | None]:
        """("gated_" + fn, 1.0, limit, up_offset, interleaved, None, up_softcap)."""
        return (
            f"gated_{self.fn}",
            1.0,
            self.limit,
            self.up_offset,
            self.interleaved,
            None,
            self.up_softcap,
        )


SWIGLU = SwiGLU()

_SQRT_HALF = math.sqrt(0.5)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class Ungated:
    """act = fn(h) for experts without a gate: the pre-activation h is F wide (w13 [E, F, d]).

    Args:
        fn: "relu2" (relu(h)^2), "gelu" (erf GELU), "gelu_tanh" (tanh approximation), "relu"
            or "silu", as torch computes them (see the module docstring).
    """

    fn: str
    gated: ClassVar[bool] = False
    interleaved: ClassVar[bool] = False  # one pre-activation column per activation column

    def __post_init__(self):
        if self.fn not in UNGATED_FUNCTIONS:
            raise ValueError(f"Ungated fn must be one of {UNGATED_FUNCTIONS}, got {self.fn!r}")

    def pre_width(self, ffn: int) -> int:
        """The pre-activation's width (w13's rows) for `ffn` activation columns: F."""
        return ffn

    def ffn(self, pre_width: int) -> int:
        return pre_width

    def apply(self, pre: torch.Tensor) -> torch.Tensor:
        """fn(pre), in its dtype (differentiable)."""
        if self.fn == "relu2":
            return F.relu(pre).square()
        if self.fn == "gelu_tanh":
            return F.gelu(pre, approximate="tanh")
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[self.fn](pre)

    def grad(self, pre: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
        """d_act * fn'(pre)."""
        return d_act * self.slope(pre)

    def slope(self, pre: torch.Tensor) -> torch.Tensor:
        """fn'(pre), written out (the formulas of the kernels' epilogues)."""
        if self.fn == "relu":
            return (pre > 0).to(pre.dtype)
        if self.fn == "relu2":
            return 2 * F.relu(pre)
        if self.fn == "gelu":
            cdf = 0.5 * (1 + torch.erf(pre * _SQRT_HALF))
            return cdf + pre * torch.exp(-0.5 * pre * pre) * (_SQRT_HALF / math.sqrt(math.pi))
        if self.fn == "gelu_tanh":  # 0.5 * (1 + tanh(u)) = sigmoid(2u)
            u_grad = 2 * _GELU_TANH_C * (1 + 3 * 0.044715 * pre * pre)
            sig = torch.sigmoid(2 * _GELU_TANH_C * (pre + 0.044715 * pre**3))
            return sig + pre * sig * (1 - sig) * u_grad
        sig = torch.sigmoid(pre)  # silu
        return sig * (1 + pre * (1 - sig))

    @property
    def constants(self) -> tuple[str, float, None, float, bool, None, None]:
        """(fn, 1.0, None, 0.0, False, None, None): SwiGLU.constants' fields, the fn as the
        kind."""
        return self.fn, 1.0, None, 0.0, False, None, None


UNGATED_FUNCTIONS = ("relu", "relu2", "gelu", "gelu_tanh", "silu")
GATED_FUNCTIONS = ("relu", "relu2", "gelu", "gelu_tanh")  # SiLU's is SwiGLU

Activation = SwiGLU | Gated | Ungated


def activation_of(
    kind: str,
    alpha: float,
    limit: float | None,
    up_offset: float,
    interleaved: bool,
    gate_softcap: float | None,
    up_softcap: float | None,
):
    """The activation whose `constants` these are."""
    if kind == "swiglu":
        return SwiGLU(alpha, limit, up_offset, interleaved, gate_softcap, up_softcap)
    if kind.startswith("gated_"):
        return Gated(kind.removeprefix("gated_"), limit, up_offset, interleaved, up_softcap)
    return Ungated(kind)


def _softcap(y: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(y / cap), or y when cap is None."""
    return y if cap is None else cap * torch.tanh(y / cap)


def _softcap_and_slope(y: torch.Tensor, cap: float | None):
    """(`_softcap(y, cap)`, its derivative 1 - tanh(y / cap)^2; 1 when cap is None)."""
    if cap is None:
        return y, 1.0
    tanh = torch.tanh(y / cap)
    return cap * tanh, 1 - tanh * tanh


def identify(fn, candidates: dict):
    """The first key of `candidates` ({key: elementwise torch function}) whose function computes
    what the elementwise function `fn` (an integration's activation module or function)
    computes, found by evaluating both: to float32 rounding on float64 points across [-16, 16],
    0 among them, and out to +-1e4 (a clipped GELU is not a GELU); None if none does (or `fn` is
    not a function of one tensor)."""
    far = torch.logspace(1.5, 4, 11, dtype=torch.float64)
    grid = torch.cat([torch.linspace(-16, 16, 321, dtype=torch.float64), far, -far])
    try:
        computed = fn(grid)
    except Exception:
        return None
    if not torch.is_tensor(computed):
        return None
    for key, candidate in candidates.items():
        if torch.allclose(computed.double(), candidate(grid), rtol=1e-6, atol=1e-9):
            return key
    return None


def evaluated_once(finder):
    """`finder(*args)` (an evaluation of an integration's functions on sample points: `identify`;
    it returns an activation, a bool or None) computed once per args and remembered.
    torch.compile runs the evaluation while tracing and takes its result as a constant
    (torch.compiler.assume_constant_result): no graph break, where tracing its data-dependent
    comparisons would break the graph at each of them. The constant is plain values (an
    activation's `constants`, rebuilt outside), and the args must be values dynamo passes as
    they are: numbers, strings, classes, functions, modules (not a dataclass built in the
    traced code: pass its fields). Before torch 2.12 an evaluation with a module argument breaks
    the graph instead (`_MODULE_CONSTANTS`)."""
    found = {}

    @torch.compiler.assume_constant_result
    def evaluate_constant(*args):
        result = finder(*args)
        return result.constants if isinstance(result, Activation) else result

    def remembered(*args):
        # A module is remembered by identity while it lives, not kept alive by the cache.
        modules = [arg for arg in args if isinstance(arg, torch.nn.Module)]
        key = tuple(
            ("module", id(arg)) if isinstance(arg, torch.nn.Module) else arg for arg in args
        )
        if key not in found:
            # On real sample points even under FakeTensorMode (memory estimation): it compares
            # values.
            with unset_fake_temporarily():
                found[key] = finder(*args)
            for module in modules:
                weakref.finalize(module, found.pop, key, None)
        return found[key]

    @functools.wraps(finder)
    def lookup(*args):
        if not torch.compiler.is_compiling():
            return remembered(*args)
        if _MODULE_CONSTANTS or not any(isinstance(arg, torch.nn.Module) for arg in args):
            result = evaluate_constant(*args)  # while tracing: a constant of the graph
            return activation_of(*result) if isinstance(result, tuple) else result
        return torch.compiler.disable(remembered)(*args)  # a graph break

    return lookup


# Dynamo before torch 2.12 takes no module as an argument of an assume_constant_result function
# (an internal error, AsPythonConstantNotImplementedError, that ends the compile: seen with torch
# 2.11 on an act_fn module; 2.12 and 2.13 take it); there `evaluated_once` runs an evaluation
# with a module argument eagerly (torch.compiler.disable), breaking the graph.
_MODULE_CONSTANTS = torch.torch_version.TorchVersion(torch.__version__) >= "2.12"


@evaluated_once
def ungated_computing(fn) -> Ungated | None:
    """The Ungated that computes the elementwise function `fn` (`identify`), or None."""
    ungated = (Ungated(name) for name in UNGATED_FUNCTIONS)
    return identify(fn, {activation: activation.apply for activation in ungated})


# The gate functions of SwiGLU: y * sigmoid(alpha * y), SiLU (1.0) and quick GELU (1.702).
SWIGLU_ALPHAS = (1.0, 1.702)


@evaluated_once
def gated_unit_computing(fn) -> SwiGLU | Gated | None:
    """The gated unit act = fn(gate) * up for the elementwise gate function `fn`
    (`identify`): SwiGLU(alpha) where fn is SiLU or quick GELU, Gated where it is another
    Ungated function, else None."""
    glus = {SwiGLU(a): (lambda y, a=a: y * torch.sigmoid(a * y)) for a in SWIGLU_ALPHAS}
    others = {Gated(name): Ungated(name).apply for name in GATED_FUNCTIONS}
    return identify(fn, {**glus, **others})


def check_activation(activation) -> None:
    """A TypeError naming what was passed unless it is a SwiGLU, a Gated or an Ungated."""
    if not isinstance(activation, SwiGLU | Gated | Ungated):
        raise TypeError(
            f"activation must be a moeblaze.SwiGLU, moeblaze.Gated or moeblaze.Ungated, got "
            f"{activation!r}"
        )
