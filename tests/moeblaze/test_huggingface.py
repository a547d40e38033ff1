"""Hugging Face integration: tiny random models with experts_implementation="moeblaze" against
"eager" (logits, loss, every gradient), per model family (hand-written tiny configs, and
default configs made tiny); the recompute variants; loading with
from_pretrained; expert-parallel sentinel ids; the families moeblaze cannot run; GPT-OSS's MoE
block (router and experts) as a moeblaze.MoELayer.

# B batch, L sequence, T = B*L tokens, d hidden, F expert ffn, E experts, k top-k
"""

import re
import types

import pytest
import torch
from tolerance import assert_bf16_close, assert_close
from torch import nn

import moeblaze
from moeblaze.activation import gated_unit_computing, ungated_computing

transformers = pytest.importorskip("transformers", minversion="5")
hf = pytest.importorskip("moeblaze.integrations.huggingface")

B, L, VOCAB = 2, 5, 64
RTOL = 1e-5  # float32 moeblaze against float32 eager; measured <= 1e-6 on every family
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: faster on these tiny tensors, and not slowed down by other processes
    holding the cores (two threads then wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(family: str, **overrides):
    """A tiny random config of one MoE family (E=4 experts, k=2, F=16)."""
    configs = {
        "mixtral": (
            "MixtralConfig",
            dict(
                intermediate_size=16,
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
            ),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            dict(
                intermediate_size=24,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
            ),
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            dict(
                intermediate_size=24,
                moe_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=16,
                output_router_logits=True,
            ),
        ),
        "olmoe": (
            "OlmoeConfig",
            dict(
                intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
            ),
        ),
        # Sigmoid routing with a score-correction bias, 2 groups of 2 experts, a shared expert.
        "deepseek_v3": (
            "DeepseekV3Config",
            dict(
                intermediate_size=24,
                moe_intermediate_size=16,
                n_routed_experts=4,
                n_shared_experts=1,
                num_experts_per_tok=2,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=0,
                kv_lora_rank=8,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                v_head_dim=16,
                qk_nope_head_dim=8,
            ),
        ),
        # Gate and up columns interleaved (is_concatenated=False), biases, transposed weights,
        # a clamped quick-GELU SwiGLU.
        "gpt_oss": (
            "GptOssConfig",
            dict(
                intermediate_size=16,
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=16,
                output_router_logits=True,
            ),
        ),
        # Transposed expert weights (is_transposed=True): gate_up_proj [E, d, 2F].
        "aria": (
            "AriaTextConfig",
            dict(
                intermediate_size=16,
                moe_intermediate_size=16,
                moe_num_experts=4,
                moe_topk=2,
                moe_num_shared_experts=1,
            ),
        ),
        # GeGLU experts (GELU's tanh form as the gate: moeblaze.Gated) beside a dense MLP in
        # each layer, a router with per-expert scales; full attention, no per-layer inputs.
        "gemma4_text": (
            "Gemma4TextConfig",
            dict(
                intermediate_size=24,
                moe_intermediate_size=16,
                num_experts=4,
                top_k_experts=2,
                enable_moe_block=True,
                head_dim=16,
                layer_types=["full_attention"],
                hidden_size_per_layer_input=0,
            ),
        ),
    }
    name, kwargs = configs[family]
    return getattr(transformers, name)(**{**COMMON, **kwargs, **overrides})


FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "aria",
    "gemma4_text",
)


def _models(family, dtype=torch.float32, device="cpu", make_config=_config):
    """(moeblaze model built by from_config, eager model with the same weights)."""
    # One config each: from_config(..., experts_implementation=) writes it into the config.
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM
    model = auto.from_config(make_config(family), experts_implementation="moeblaze")
    eager = auto.from_config(make_config(family), experts_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return [m.to(device=device, dtype=dtype).train() for m in (model, eager)]


# More families, each from its default config made tiny: the COMMON sizes and these MoE fields,
# where the config has them (E=4 experts, k=2, F=16, one shared expert, every layer sparse with
# full attention).
TINY_MOE_FIELDS = dict(
    intermediate_size=24,
    moe_intermediate_size=16,
    expert_intermediate_size=16,
    shared_expert_intermediate_size=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    num_shared_experts=1,
    n_shared_experts=1,
    moe_num_shared_experts=1,
    moe_layer_start_index=0,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
    num_dense_layers=0,
    mlp_layer_types=["sparse"],  # per layer: one layer (COMMON), sparse
    layer_types=["full_attention"],
    decoder_sparse_step=1,
    mlp_only_layers=[],
    head_dim=16,
    kv_lora_rank=8,
    q_lora_rank=8,
    num_key_value_heads=2,  # multi-head latent attention: as many as the attention heads
    index_topk=4,  # DeepSeek sparse attention's indexer
    index_head_dim=8,
    index_n_heads=2,
    use_cache=False,  # (the indexer's cache needs an indexed cache layer)
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
DEFAULT_CONFIG_FAMILIES = (
    "phimoe",
    "glm4_moe",
    "dots1",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "granitemoeshared",
    "deepseek_v2",
    "minimax",
    "exaone_moe",
    "solar_open",
    "cohere2_moe",
    "afmoe",
    "flex_olmo",
    "flint",
    "granitemoe",
    "granitemoe_swa",
    "kolibri1",
    "mellum",
    "minimax_m2",
    "hy_v3",
    "laguna",
    "mimo_v2_flash",
    "qwen3_next",  # its linear-attention layers replaced by full attention (layer_types)
    "kimi_linear",
    "bailing_hybrid",
    "beam",  # a custom _apply_gate: SwiGLU in float32
    "hy_v4",  # a custom _apply_gate: clamped SwiGLU
    "glm4_moe_lite",
    "lfm2_moe",
    "axk2",
    "deepseek_v32",
    "glm_moe_dsa",
    "zaya",
    "jamba",
    "granitemoehybrid",
    "axk1",
    "nemotron_h",  # experts without a gate: ReLU² (moeblaze.Ungated)
    "inkling2_text",  # a custom _apply_gate: soft-capped SwiGLU
    "inkling_text",
    "minimax_m3_vl_text",  # a custom _apply_gate: clamped quick-GELU SwiGLU (+1)
    "qwen3_5_moe_text",  # its linear-attention layers replaced by full attention (layer_types)
    "deepseek_v4",  # its own attention layer types, routed experts only (no hash routing)
    # transformers 5.24's (skipped with 5.23)
    "inkling2_loop_text",  # a custom _apply_gate: soft-capped SwiGLU
    "lara_mini",
    "sarvam_moe",
)
# (fields, fields left out) a family needs besides those.
FAMILY_FIELDS = {
    "deepseek_v4": (dict(mlp_layer_types=["moe"]), ("layer_types",)),
    "inkling2_text": (dict(mlp_gate_softcap=0.5, mlp_up_softcap=0.3), ()),  # caps that bend
    "inkling2_loop_text": (dict(mlp_gate_softcap=0.5, mlp_up_softcap=0.3), ()),
    "zaya": (dict(num_experts_per_tok=1), ("layer_types",)),  # top-1 only; its own layer types
    "jamba": (  # attention and experts in every layer (its layer_types is computed)
        dict(
            attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0
        ),
        ("layer_types",),
    ),
    "granitemoehybrid": (dict(layer_types=["attention"], mamba_n_heads=2), ()),
    "axk1": ({}, ("head_dim",)),  # its head_dim is its qk_rope_head_dim
    # One layer, its mixer the MoE (a NemotronH layer is attention, Mamba, MLP or MoE).
    "nemotron_h": (
        dict(layers_block_type=["moe"], moe_shared_expert_intermediate_size=16),
        ("layer_types",),
    ),
}


# Gradients that are zero in "eager" too, in these tiny models: PhiMoE's sparsemixer router
# gives its weight none, nor does Zaya's attention to its query/key path.
_ZAYA_QK = (
    "q_proj.weight",
    "k_proj.weight",
    *(f"conv_qk_{c}.{p}" for c in ("depthwise", "grouped") for p in ("weight", "bias")),
)
ZERO_IN_EAGER = {
    "phimoe": ("model.layers.0.mlp.router.weight.grad",),
    "zaya": tuple(f"model.layers.0.self_attn.qkv_proj.{name}.grad" for name in _ZAYA_QK),
}
# Families compared with a looser rtol, and why. DeepSeek-V4's hyper-connections (the residual
# streams mixed through normalised, Sinkhorn-balanced weights) amplify the experts' float32
# rounding (1e-7 relative; another summation order than eager's) in their own gradients: measured
# up to 1.4e-5 (Triton kernels) and 4.9e-5 (torch stages; a one-number gradient of 3e-7 that is
# what remains of cancelling terms), every other gradient within 5e-6. A wrong expert weight,
# bias or activation is off by far more.
RTOL_IN_EAGER = {"deepseek_v4": 2e-4}


def _default_config(family: str):
    configs = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if family not in configs:
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} model")
    config_class = configs[family]
    defaults = config_class()
    extra, omitted = FAMILY_FIELDS.get(family, ({}, ()))
    fields = {**COMMON, **TINY_MOE_FIELDS, **extra}
    fields = {k: v for k, v in fields.items() if hasattr(defaults, k) and k not in omitted}
    return config_class(**fields)


def _step(model, input_ids):
    """{"logits", "loss", "<param>.grad" ...} of a forward + backward with labels = input_ids."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), **grads}


def _reference_moe_mlp(*args, recompute, **kwargs):
    """moeblaze.moe_mlp_reference in moeblaze.moe_mlp's place (it has no recompute policies)."""
    return moeblaze.moe_mlp_reference(*args, **kwargs)


def _record_moe_mlp_calls(monkeypatch, run=None) -> list:
    """Record the recompute policy and the topk_ids of every moeblaze.moe_mlp call (the
    integration looks the function up at call time); `run` replaces the computation (default:
    moeblaze.moe_mlp)."""
    calls, run = [], run or moeblaze.moe_mlp

    def recorded(*args, **kwargs):
        calls.append((kwargs["recompute"], args[1]))
        return run(*args, **kwargs)

    monkeypatch.setattr(moeblaze, "moe_mlp", recorded)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager(family, monkeypatch):
    _check_matches_eager(family, _config, monkeypatch)


@pytest.mark.parametrize("family", DEFAULT_CONFIG_FAMILIES)
def test_family_from_its_default_config_matches_eager(family, monkeypatch):
    _check_matches_eager(family, _default_config, monkeypatch)


def test_nemotron_h_latent_moe_matches_eager(monkeypatch):
    # Nemotron 3's latent MoE: the block projects tokens to moe_latent_size before its ReLU²
    # experts (which then work on [T, L]) and back after.
    def latent_config(family):
        config = _default_config(family)
        config.moe_latent_size = 8
        return config

    _check_matches_eager("nemotron_h", latent_config, monkeypatch)


def _check_matches_eager(family, make_config, monkeypatch):
    """The family's model from `make_config(family)` with "moeblaze" against "eager"."""
    model, eager = _models(family, make_config=make_config)
    assert model.config._experts_implementation == "moeblaze"
    input_ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    calls = _record_moe_mlp_calls(monkeypatch)
    actual = _step(model, input_ids)
    policies = [policy for policy, _ in calls]
    assert policies == ["activation"] * model.config.num_hidden_layers, "moeblaze did not run"
    expected = _step(eager, input_ids)
    assert actual.keys() == expected.keys()
    experts = ("gate_up_proj", "experts.up_proj")  # the latter without a gate
    assert any(e in name for name in actual for e in experts), "no expert weight got a gradient"
    for name, value in expected.items():
        if name not in ZERO_IN_EAGER.get(family, ()):
            assert value.abs().sum() > 0, f"eager gives a zero {name}: the test would not see it"
        rtol = RTOL_IN_EAGER.get(family, RTOL)
        assert_close(actual[name], value, rtol=rtol, name=f"{family} {name}")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_generate_matches_eager(family, monkeypatch):
    """Greedy generation under torch.inference_mode (prefill, then one token per step through
    the KV cache): the same tokens and each step's logits as "eager", moeblaze's experts run at
    every step."""
    model, eager = (m.eval() for m in _models(family))
    input_ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(2))
    options = dict(
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    calls = _record_moe_mlp_calls(monkeypatch)
    with torch.inference_mode():
        actual, expected = (
            model.generate(input_ids, **options),
            eager.generate(input_ids, **options),
        )
    assert len(calls) == 4 * model.config.num_hidden_layers, "moeblaze did not run every step"
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close(a, e, rtol=RTOL, name=f"{family} logits of step {step}")


def test_recompute_variants(monkeypatch):
    """Each registered name hands its policy to moeblaze.moe_mlp (whose policies
    tests/moeblaze/test_moe_mlp.py checks; here the float64 reference stands in for it)."""
    assert hf.IMPLEMENTATIONS == {
        "moeblaze": "activation",
        "moeblaze-activation": "activation",
        "moeblaze-up_proj": "up_proj",
        "moeblaze-none": "none",
    }
    calls = _record_moe_mlp_calls(monkeypatch, _reference_moe_mlp)
    model, _ = _models("olmoe")
    input_ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(2))
    for name in hf.IMPLEMENTATIONS:
        model.set_experts_implementation(name)
        model(input_ids=input_ids)
    assert [policy for policy, _ in calls] == list(hf.IMPLEMENTATIONS.values())


def _experts_inputs():
    """hidden_states [T, d], top_k_index [T, k] (distinct per token), top_k_weights [T, k]."""
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(B * L)])
    return torch.randn(B * L, 32, generator=g), ids, torch.rand(B * L, 2, generator=g)


def test_expert_parallel_sentinels(monkeypatch):
    """Slots of other ranks' experts (ids >= E, weight 0) contribute nothing, as in eager: not
    to the output, nor to dx or the routing-weight gradient; they reach moe_mlp as dropped slots
    (-1), which take no GEMM rows."""
    model, eager = _models("mixtral")
    x, ids, weights = _experts_inputs()
    ids[::3, 1] = 4  # a sentinel: that expert lives on another rank
    weights = weights.masked_fill(ids == 4, 0.0)
    experts = [m.model.layers[0].mlp.experts for m in (model, eager)]
    for module in experts:
        module._is_expert_parallel = True
    calls = _record_moe_mlp_calls(monkeypatch)
    results = []
    for module in experts:
        leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        out = module(*leaves[:1], ids, leaves[1])
        out.sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for name, ours, theirs in zip(("out", "dx", "dweights"), *results, strict=True):
        assert_close(ours, theirs, rtol=RTOL, name=name)
    ((_, topk_ids),) = calls
    assert torch.equal(topk_ids, ids.masked_fill(ids == 4, moeblaze.DROPPED))


@pytest.mark.parametrize(
    ("family", "config_class", "config_kwargs", "missing"),
    [
        (
            "nemotron_h",
            "NemotronHConfig",
            dict(n_routed_experts=4, moe_intermediate_size=16, mlp_hidden_act="sigmoid"),
            ["Sigmoid() (without a gate), which no moeblaze.Ungated is"],
        ),
        (
            "mixtral",
            "MixtralConfig",
            dict(num_local_experts=4, intermediate_size=16, hidden_act="sigmoid"),
            ["the gate activation Sigmoid(), which no moeblaze.SwiGLU or Gated computes"],
        ),
    ],
    ids=["nemotron_h", "mixtral_sigmoid"],
)
def test_unsupported_experts_raise(family, config_class, config_kwargs, missing):
    modeling = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    (experts_class,) = [n for n in dir(modeling) if n.endswith("Experts")]
    config = getattr(transformers, config_class)(hidden_size=32, **config_kwargs)
    experts = getattr(modeling, experts_class)(config)
    config._experts_implementation = "moeblaze"
    ids, weights = torch.zeros(3, 2, dtype=torch.int64), torch.full((3, 2), 0.5)  # [T, k]
    with pytest.raises(NotImplementedError) as error:
        experts(torch.randn(3, 32), ids, weights)
    message = str(error.value)
    for text in [experts_class, f"model family {family!r}", *missing]:
        assert text in message, f"{text!r} not in: {message}"
    assert "_apply_gate" not in message  # the gates moeblaze knows are not named


@pytest.mark.parametrize(
    ("name", "fn", "gated"),
    [
        ("relu2", "relu2", moeblaze.Gated("relu2")),  # NemotronH's
        ("gelu", "gelu", moeblaze.Gated("gelu")),
        ("gelu_new", "gelu_tanh", moeblaze.Gated("gelu_tanh")),  # the tanh form written out
        ("gelu_pytorch_tanh", "gelu_tanh", moeblaze.Gated("gelu_tanh")),  # Gemma's
        ("gelu_fast", "gelu_tanh", moeblaze.Gated("gelu_tanh")),
        ("relu", "relu", moeblaze.Gated("relu")),
        ("silu", "silu", moeblaze.SwiGLU()),
        ("quick_gelu", None, moeblaze.SwiGLU(alpha=1.702)),
        ("gelu_10", None, None),  # clipped at 10
        ("sigmoid", None, None),
    ],
)
def test_activation_is_found_by_what_act_fn_computes(name, fn, gated):
    # Without a gate, the Ungated of that function; as the gate of a GLU, the SwiGLU (SiLU,
    # quick GELU) or Gated unit.
    from transformers.activations import ACT2FN

    expected = None if fn is None else moeblaze.Ungated(fn)
    assert ungated_computing(ACT2FN[name]) == expected
    assert gated_unit_computing(ACT2FN[name]) == gated


def test_act_fn_classes_compute_what_they_are_read_as():
    # The activation classes read without evaluating them (ACT_FN_CLASSES) compute the function
    # they are read as, as evaluating them finds.
    assert len(hf.ACT_FN_CLASSES) == 8
    for cls, fn in hf.ACT_FN_CLASSES.items():
        assert ungated_computing(cls()) == moeblaze.Ungated(fn), cls


@pytest.mark.parametrize(
    ("family", "act_fn"),
    [
        ("gemma4_text", None),  # GeGLU, read from act_fn's class
        ("nemotron_h", None),  # ReLU² without a gate, read from act_fn's class
        ("gemma4_text", nn.GELU(approximate="tanh")),  # an act_fn found by evaluating it
        ("gpt_oss", None),  # a custom _apply_gate, checked by evaluating it
        ("inkling2_text", None),  # a custom _apply_gate calling its act_fn module, evaluated
    ],
)
def test_compile_breaks_no_graph(family, act_fn):
    # torch.compile traces the activation's choice without a graph break from the first call
    # on (a class read, or an evaluation dynamo runs while tracing): as many graphs as the model
    # compiles to with "grouped_mm" (with torch 2.13 one, or GPT-OSS's two: transformers
    # installs its output hooks in the first call; with torch 2.11 Gemma 4's three), and eager's
    # output. Before torch 2.12 an evaluation given a module (an act_fn module: Gemma 4's here,
    # Inkling 2's) runs eagerly, a graph break per layer (moeblaze.activation._MODULE_CONSTANTS):
    # then the output alone is checked.
    from torch._dynamo.testing import CompileCounter

    from moeblaze.activation import _MODULE_CONSTANTS as module_constants

    config = _config(family) if family in FAMILIES else _default_config(family)
    input_ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1))
    graphs = {}
    for implementation in ("grouped_mm", "moeblaze"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            config, experts_implementation=implementation
        )
        for module in model.modules():
            if act_fn is not None and hasattr(module, "has_gate"):
                module.act_fn = act_fn
        torch._dynamo.reset()
        counter = CompileCounter()
        with moeblaze.use_backend("torch"):
            compiled = torch.compile(model, backend=counter)(input_ids=input_ids).logits
            eager = model(input_ids=input_ids).logits
        graphs[implementation] = counter.frame_count
        assert_close(compiled, eager, rtol=1e-6, name=f"{family} {implementation} logits")
    if not module_constants and (act_fn is not None or family == "inkling2_text"):
        return
    assert graphs["moeblaze"] == graphs["grouped_mm"] <= 3, graphs


def _experts_pair(family: str, config_class: str, **fields):
    """Two experts modules of `family` (its one *Experts class), one on "eager" and one on
    "moeblaze", from `config_class(hidden_size=32, **fields)`, with the same random parameters
    (biases too) of the scale of nn.Linear's."""
    modeling = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    (experts_class,) = [n for n in dir(modeling) if n.endswith("Experts")]

    def config_for(implementation):
        config = getattr(transformers, config_class)(hidden_size=32, **fields)
        config._experts_implementation = implementation
        return config

    return _experts_modules(getattr(modeling, experts_class), config_for)


def _experts_modules(experts_class, config_for):
    """`experts_class` on "eager" and on "moeblaze" (`config_for(implementation)` gives each one's
    config), with the same random parameters (biases too) of the scale of nn.Linear's."""
    experts = []
    for implementation in ("eager", "moeblaze"):
        config = config_for(implementation)
        torch.manual_seed(3)
        module = experts_class(config)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
        experts.append(module)
    return experts


def _deepseek_v4_experts(limit: float):
    return _experts_pair(
        "deepseek_v4",
        "DeepseekV4Config",
        n_routed_experts=4,
        moe_intermediate_size=16,
        swiglu_limit=limit,
    )


def _hy_v4_experts(limit: float):
    return _experts_pair(
        "hy_v4", "HYV4Config", num_local_experts=4, moe_intermediate_size=16, swiglu_limit=limit
    )


def _gpt_oss_experts(limit: float):
    return _experts_pair(
        "gpt_oss", "GptOssConfig", num_local_experts=4, intermediate_size=16, swiglu_limit=limit
    )


# Limits that clamp a good part of the pre-activations of these random experts.
CUSTOM_GATE_EXPERTS = {
    "deepseek_v4": (_deepseek_v4_experts, moeblaze.SwiGLU(limit=0.5)),
    "hy_v4": (_hy_v4_experts, moeblaze.SwiGLU(limit=0.5)),
    "gpt_oss": (
        _gpt_oss_experts,
        moeblaze.SwiGLU(alpha=1.702, limit=0.5, up_offset=1.0, interleaved=True),
    ),
}


# Every family of transformers 5.23 whose experts dispatch through the experts interface, then
# those that 5.24 added (skipped with 5.23).
EXPERTS_FAMILIES = (
    "afmoe", "aria", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2",
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "diffusion_gemma", "dots1",
    "dots3_note", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo", "flint", "gemma4",
    "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "gpt_oss", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4",
    "inkling", "inkling2", "jamba", "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "mellum",
    "mimo_v2_flash", "minimax", "minimax_m2", "minimax_m3_vl", "mistral4", "mistral_large4",
    "mixtral", "muse_spark", "nemotron_h", "olmoe", "openai_privacy_filter", "phimoe",
    "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe",
    "qwen4_exp", "solar_open", "unlimited_ocr", "zaya",
    "hy_v4_vl", "inkling2_loop", "lara_mini",
)  # fmt: skip
# The config fields their experts read (each class reads a few; tiny sizes, the activations the
# families use, limits that clamp and soft caps that bend a good part of these pre-activations).
EXPERTS_CONFIG = dict(
    TINY_MOE_FIELDS,
    hidden_size=32,
    moe_hidden_size=32,  # its experts' input size
    hidden_act="silu",
    hidden_activation="gelu_pytorch_tanh",  # Gemma's
    swiglu_limit=0.5,
    limit=0.5,
    swiglu_alpha=1.702,
    alpha=1.702,
    mlp_gate_softcap=0.5,
    mlp_up_softcap=0.3,
    post_norm_eps=1e-8,
    mlp_hidden_act="relu2",  # NemotronH's
    moe_latent_size=None,
)
# The experts moeblaze refuses, and why (in the NotImplementedError).
EXPERTS_REFUSED = {
    "MuseSparkExperts": "a norm after each expert",
}


@pytest.mark.parametrize("family", EXPERTS_FAMILIES)
def test_every_experts_class_matches_eager_or_is_refused(family):
    """Each experts class of the family (those the experts interface dispatches) on "moeblaze"
    against "eager": output, dx, the routing weights' and every parameter's gradient; or a
    NotImplementedError saying why (EXPERTS_REFUSED). moeblaze's torch stages run the experts:
    the mapping of weights, biases and activation is what is tested here (the kernels are
    tested against the same stages elsewhere)."""
    modeling = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    tested = 0
    for name in (n for n in dir(modeling) if n.endswith("Experts")):
        modules = _experts_modules(
            getattr(modeling, name),
            lambda implementation: types.SimpleNamespace(
                **EXPERTS_CONFIG, _experts_implementation=implementation
            ),
        )
        if not hasattr(modules[1], "has_gate"):  # not dispatched by the experts interface
            continue
        tested += 1
        x, ids, weights = _experts_inputs()
        results = []
        for module in modules:
            leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
            if name in EXPERTS_REFUSED and module is modules[1]:
                with pytest.raises(NotImplementedError, match=re.escape(EXPERTS_REFUSED[name])):
                    module(leaves[0], ids, leaves[1])
                break
            with moeblaze.use_backend("torch"):
                out = module(leaves[0], ids, leaves[1])
            out.backward(torch.ones_like(out))
            results.append([out, *(t.grad for t in leaves), *(p.grad for p in module.parameters())])
        if name not in EXPERTS_REFUSED:
            names = ["out", "dx", "dweights", *(n for n, _ in modules[0].named_parameters())]
            for what, eager, ours in zip(names, *results, strict=True):
                assert_close(ours.detach(), eager.detach(), rtol=RTOL, name=f"{name} {what}")
    assert tested > 0, f"no experts class of {family} dispatches through the experts interface"


@pytest.mark.parametrize("family", CUSTOM_GATE_EXPERTS)
def test_custom_gate_experts_match_eager(family):
    # DeepseekV4Experts._apply_gate (and HYV4Experts') clamps gate and up: moeblaze runs it as
    # SwiGLU(limit=...).
    # GptOssExperts clamps too, with quick GELU on gate and up interleaved, and has biases.
    make, activation = CUSTOM_GATE_EXPERTS[family]
    experts = make(limit=activation.limit)
    assert hf._activation_of(experts[1]) == (activation, None)
    x, ids, weights = _experts_inputs()
    (w13, _), (b13, _) = hf.expert_weights(experts[1]), hf.expert_biases(experts[1])
    pre = torch.einsum("td,efd->tef", x, w13) + (0 if b13 is None else b13)  # every expert
    assert (activation.split(pre)[0] > activation.limit).float().mean() > 0.1  # clamps
    results = []
    for module in experts:
        leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        out = module(leaves[0], ids, leaves[1])
        out.backward(torch.ones_like(out))
        results.append(
            [out.detach(), *(t.grad for t in leaves), *(p.grad for p in module.parameters())]
        )
    names = ["out", "dx", "dweights", *(n for n, _ in experts[0].named_parameters())]
    for name, eager, ours in zip(names, *results, strict=True):
        assert_close(ours, eager, rtol=RTOL, name=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_model_under_fake_tensor_mode(family):
    # Memory estimation runs a model on fake tensors: the moeblaze experts (GPT-OSS's gate
    # identified by evaluating it on real sample points) run forward and backward.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = transformers.AutoModelForCausalLM.from_config(
            _config(family), experts_implementation="moeblaze"
        )
        ids = torch.randint(model.config.vocab_size, (2, 5))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert isinstance(out.logits, FakeTensor) and out.logits.shape[:2] == (2, 5)


def test_gpt_oss_block_is_a_moeblaze_layer():
    """moeblaze.MoELayer(bias=True) with GPT-OSS's SwiGLU, given a GptOssMLP's parameters,
    computes that block: its router's bias, softmax over the top-k logits (= norm_topk_prob),
    interleaved experts with biases; output and every gradient against the block on "eager"."""
    modeling = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    d, ffn, experts, k = 32, 16, 4, 2
    config = transformers.GptOssConfig(
        hidden_size=d,
        intermediate_size=ffn,
        num_local_experts=experts,
        num_experts_per_tok=k,
        swiglu_limit=0.5,
    )
    config._experts_implementation = "eager"
    torch.manual_seed(4)
    block = modeling.GptOssMLP(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    swiglu = moeblaze.SwiGLU(
        alpha=config.swiglu_alpha, limit=config.swiglu_limit, up_offset=1.0, interleaved=True
    )
    layer = moeblaze.MoELayer(d, ffn, experts, k, bias=True, activation=swiglu)
    transpose = lambda t: t.transpose(1, 2)  # noqa: E731  [E, in, out] <-> [E, out, in]
    same = lambda t: t  # noqa: E731
    theirs = {  # moeblaze name: (GptOssMLP name, their layout -> ours)
        "router.weight": ("router.weight", same),
        "router.bias": ("router.bias", same),
        "w13": ("experts.gate_up_proj", transpose),
        "b13": ("experts.gate_up_proj_bias", same),
        "w2": ("experts.down_proj", transpose),
        "b2": ("experts.down_proj_bias", same),
    }
    block_params = dict(block.named_parameters())
    assert dict(layer.named_parameters()).keys() == theirs.keys()
    assert block_params.keys() == {name for name, _ in theirs.values()}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            block_name, convert = theirs[name]
            p.copy_(convert(block_params[block_name]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, d, generator=g)
    dout = torch.randn(B, L, d, generator=g)
    results = []
    for run in (lambda t: block(t)[0], layer):
        leaf = x.clone().requires_grad_()
        out = run(leaf)
        out.backward(dout)
        results.append((out.detach(), leaf.grad))
    assert_close(results[1][0], results[0][0], rtol=RTOL, name="out")
    assert_close(results[1][1], results[0][1], rtol=RTOL, name="dx")
    for name, p in layer.named_parameters():
        block_name, convert = theirs[name]
        assert_close(p.grad, convert(block_params[block_name].grad), rtol=RTOL, name=name)


def test_deepseek_v4_router_is_a_moeblaze_router():
    """moeblaze.Router(score_func="sqrtsoftplus", expert_bias=True) with DeepSeek-V4's routed
    scaling factor, given a DeepseekV4TopKRouter's weight and correction bias, chooses its
    experts (with a bias that changes the choice) and gives them its weights, whose gradient
    reaches the router weight alike."""
    modeling = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    d, experts, k = 32, 8, 3
    config = transformers.DeepseekV4Config(
        hidden_size=d, n_routed_experts=experts, num_experts_per_tok=k, routed_scaling_factor=1.5
    )
    assert config.scoring_func == "sqrtsoftplus"
    torch.manual_seed(6)
    theirs = modeling.DeepseekV4TopKRouter(config)
    ours = moeblaze.Router(
        d,
        experts,
        k,
        score_func="sqrtsoftplus",
        expert_bias=True,
        topk_scaling_factor=config.routed_scaling_factor,
    )
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, experts))
        ours.weight.copy_(theirs.weight)
        ours.expert_bias.copy_(theirs.e_score_correction_bias)
    x = torch.randn(B * L, d, generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(B * L, experts, generator=torch.Generator().manual_seed(8))
    dense = {}
    for name, route in (("theirs", lambda t: theirs(t)[1:]), ("ours", ours)):
        out = route(x)
        weights, ids = (out.topk_weights, out.topk_ids) if name == "ours" else out
        dense[name] = weights.new_zeros(B * L, experts).scatter(1, ids, weights)
        (dense[name] * upstream).sum().backward()
    assert torch.equal(dense["ours"] != 0, dense["theirs"] != 0), "other experts chosen"
    unbiased = ours(x).logits.topk(k, dim=-1).indices
    assert not torch.equal(unbiased.sort(-1).values, ours(x).topk_ids.sort(-1).values)
    assert_close(dense["ours"].detach(), dense["theirs"].detach(), rtol=1e-6, name="weights")
    assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, name="router weight grad")


def test_a_changed_custom_gate_is_refused(monkeypatch):
    # Were DeepseekV4Experts._apply_gate to compute something else (here a soft cap), the check
    # against the class's own gate refuses it instead of computing the clamp.
    experts = _deepseek_v4_experts(limit=0.5)[1]
    cls = type(experts)
    monkeypatch.setattr(
        cls, "_apply_gate", lambda self, gate_up: self.act_fn(gate_up.chunk(2, -1)[0].tanh())
    )
    x, ids, weights = _experts_inputs()
    with pytest.raises(
        NotImplementedError, match=r"DeepseekV4Experts._apply_gate \(not SwiGLU\(limit=0.5\)"
    ):
        experts(x, ids, weights)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager_bf16_gpu(family):
    """bf16 on the GPU: moeblaze's error against float64 eager is at most 2x eager's in bf16."""
    model, eager = _models(family, dtype=torch.bfloat16, device="cuda")
    if not any(hasattr(module, "has_gate") for module in model.modules()):  # (Aria before 5.23)
        pytest.skip(
            f"transformers {transformers.__version__}'s {family} does not dispatch its experts "
            f"through the experts interface"
        )
    _, oracle = _models(family, dtype=torch.float64, device="cuda")
    input_ids = torch.randint(
        3, VOCAB, (B, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
    )
    actual, torch_bf16, expected = (_step(m, input_ids) for m in (model, eager, oracle))
    for name, value in expected.items():
        assert_bf16_close(
            actual[name], value, torch_bf16[name], factor=2.0, name=f"{family} {name}"
        )
