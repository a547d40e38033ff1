"""The activation functions of moeblaze.activation as Triton helpers, in fp32, for the epilogues
of the expert kernels (gate_up's forward, grad_act's backward; moeblaze.kernels.expert_mlp).

Each returns the value and the slope its backward needs; the torch forms (`SwiGLU.forward`,
`Ungated.slope`, ...) are the references they are tested against (tests/moeblaze/
test_activation.py).
"""

import triton
import triton.language as tl


@triton.jit
def gated(
    gate,
    up,
    ACT: tl.constexpr,
    ALPHA: tl.constexpr,
    LIMIT: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    GATE_SOFTCAP: tl.constexpr,
    UP_SOFTCAP: tl.constexpr,
):
    """A gated unit of the halves gate and up (split from h by the caller, as INTERLEAVED says),
    in fp32: moeblaze.SwiGLU(ALPHA, LIMIT, UP_OFFSET, gate_softcap=GATE_SOFTCAP,
    up_softcap=UP_SOFTCAP) if ACT is "swiglu", else moeblaze.Gated(ACT, LIMIT, UP_OFFSET,
    up_softcap=UP_SOFTCAP). Returns (act, glu = the gate function at gate', d glu / d gate',
    cap(up') + UP_OFFSET) with gate' and up' the clamped halves. The constants are compile-time:
    plain SwiGLU (1.0, None, 0.0, None, None) compiles to silu(gate) * up and nothing more."""
    gate = gate.to(tl.float32)
    if LIMIT is not None:  # clamps that keep NaN, as torch.clamp does
        gate = tl.minimum(gate, LIMIT, propagate_nan=tl.PropagateNan.ALL)
        up = tl.clamp(up.to(tl.float32), -LIMIT, LIMIT, propagate_nan=tl.PropagateNan.ALL)
    if ACT == "swiglu":
        sig = tl.sigmoid(gate) if ALPHA == 1.0 else tl.sigmoid(ALPHA * gate)
        if GATE_SOFTCAP is not None:  # the linear factor capped, the sigmoid's argument not
            capped = tanh(gate / GATE_SOFTCAP)
            glu = GATE_SOFTCAP * capped * sig
            slope = sig * (1.0 - capped * capped + ALPHA * GATE_SOFTCAP * capped * (1.0 - sig))
        else:
            glu = gate * sig
            if ALPHA == 1.0:
                slope = sig * (1.0 + gate * (1.0 - sig))
            else:
                slope = sig * (1.0 + ALPHA * gate * (1.0 - sig))
    else:
        glu, slope = ungated(gate, ACT)
    up = up.to(tl.float32)  # converted here, after the gate function: fewer registers live
    if UP_SOFTCAP is not None:
        up = UP_SOFTCAP * tanh(up / UP_SOFTCAP)
    if UP_OFFSET != 0.0:
        up = up + UP_OFFSET
    return glu * up, glu, slope, up


@triton.jit
def tanh(y):
    """tanh(y) in fp32 to a few ulp (Triton has no tanh that its interpreter runs): an odd
    series for |y| < 1/4, (1 - e^-2|y|) / (1 + e^-2|y|) beyond; NaN stays NaN."""
    magnitude = tl.abs(y)
    e = tl.exp(-2.0 * magnitude)
    y2 = y * y
    series = 62.0 / 2835.0
    series = -17.0 / 315.0 + y2 * series
    series = 2.0 / 15.0 + y2 * series
    series = -1.0 / 3.0 + y2 * series
    series = magnitude * (1.0 + y2 * series)
    tanh = tl.where(magnitude < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0.0, -tanh, tanh)


@triton.jit
def ungated(pre, ACT: tl.constexpr):
    """(act, d act / d pre) of moeblaze.Ungated(ACT) at the pre-activation `pre`, in fp32 (the
    formulas of Ungated.slope; GELU's tanh form through 0.5 * (1 + tanh(u)) = sigmoid(2u))."""
    pre = pre.to(tl.float32)
    if ACT == "relu":
        act = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
        slope = tl.where(pre > 0.0, 1.0, 0.0)
    elif ACT == "relu2":
        relu = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
        act = relu * relu
        slope = 2.0 * relu
    elif ACT == "gelu":
        # Phi(x) = 0.5 * (1 + erf(x / sqrt(2))), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        act = pre * cdf
        slope = cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327
    elif ACT == "gelu_tanh":  # u = sqrt(2 / pi) * (x + 0.044715 x^3)
        sig = tl.sigmoid(1.5957691216057308 * (pre + 0.044715 * pre * pre * pre))
        act = pre * sig
        slope = sig + pre * sig * (1.0 - sig) * 1.5957691216057308 * (1.0 + 0.134145 * pre * pre)
    else:
        tl.static_assert(ACT == "silu", "ACT must be swiglu or an Ungated or Gated fn")
        sig = tl.sigmoid(pre)
        act = pre * sig
        slope = sig * (1.0 + pre * (1.0 - sig))
    return act, slope
