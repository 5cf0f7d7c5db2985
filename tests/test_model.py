"""engine.models.model: the REFERENCE config matches transformers' fp32 models; decode_batched is S literal
decode steps bit for bit; op groups, output-dtype rules, weight caching and per-layer configs."""
import pytest
import torch

import engine.models.model as em
from engine.models.model import Model, mm, rope_inv_freq
from engine.models.spec import ModelSpec
from engine.numerics import formats
from engine.vocab.config import DEFAULT, REFERENCE, Config, ConfigError, ModelConfig, performance

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 160, 4, 2, 16, 256, 2
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so high, medium and low bands all occur
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(arch: str):
    """A random transformers model (fixed seed) -> (hf_model, ModelSpec, canonical weights)."""
    import transformers as tr

    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        initializer_range=0.08, attn_implementation="eager",
    )
    torch.manual_seed(1234)
    if arch == "llama":
        cfg = tr.LlamaConfig(**common, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True, rms_norm_eps=1e-5)
        hf = tr.LlamaForCausalLM(cfg)
    else:
        cfg = tr.Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
        hf = tr.Qwen2ForCausalLM(cfg)
    hf.eval()
    with torch.no_grad():  # norm weights init to 1; make them matter; Qwen2 biases init to 0
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith("_proj.bias"):
                p.copy_(1.0 * (n.endswith("norm.weight")) + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone().float() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    spec = ModelSpec(
        name=f"tiny-{arch}", arch=arch, n_layers=LAYERS, hidden=HIDDEN, n_heads=HEADS, n_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM, intermediate=INTER, vocab=VOCAB, rope_theta=10000.0,
        rope_scaling=dict(LLAMA3_ROPE) if arch == "llama" else None, rms_eps=cfg.rms_norm_eps,
        tied_embeddings=cfg.tie_word_embeddings, qkv_bias=arch == "qwen2",
    )
    return hf, spec, sd


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    return _tiny(request.param)


@pytest.fixture(scope="module")
def llama():
    hf, spec, sd = _tiny("llama")
    return Model(spec, sd)


def _tokens(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- reference mode ---------------------------------------------------------------------------------
def test_rope_inv_freq_matches_transformers(tiny):
    hf, spec, _ = tiny
    assert torch.equal(rope_inv_freq(spec), hf.model.rotary_emb.inv_freq)


def test_reference_matches_transformers(tiny):
    hf, spec, sd = tiny
    toks = _tokens(64)
    with torch.no_grad():
        ref = hf(toks[None]).logits[0]
        ref_next = hf(torch.cat([toks, toks[:1]])[None]).logits[0, -1]
    model = Model(spec, sd)
    logits, cache = model.prefill(toks, REFERENCE, logits_for="all")
    assert logits.dtype == torch.float32 and logits.shape == (64, VOCAB)
    assert _rel(logits, ref) < 1e-4
    assert _rel(model.prefill(toks, REFERENCE)[0], ref[-1:]) < 1e-4  # logits_for="last"
    _, cache = model.prefill(toks[:40], REFERENCE)
    dec = model.decode_batched(toks[40:], cache, REFERENCE)
    assert cache.length == 64 and _rel(dec, ref[40:]) < 1e-4
    assert _rel(model.decode_step(int(toks[0]), cache, ModelConfig.uniform(REFERENCE, LAYERS)), ref_next) < 1e-4


def test_full_precision_rule(llama, monkeypatch):
    """activation fp32 => the model rounds nothing ungoverned (only K/V to the cache format); governed
    weights and fidelities (incl. their K-block partials) still apply."""
    host = []
    real = formats.quantize
    monkeypatch.setattr(formats, "quantize", lambda x, f, rounding="host", **kw: (rounding == "host" and host.append(f)) or real(x, f, rounding, **kw))
    cfg = DEFAULT.replace(activation="fp32", kv_cache="bfp4")
    calls = _device_roundings(llama, monkeypatch, lambda: llama.prefill(_tokens(20), cfg))
    assert {(s, f) for s, f in calls if f != "fp32"} == {((20, KV_HEADS, HEAD_DIM), "bfp4")}  # K and V only
    assert "bfp8" in host  # weights still bfp8
    fp = llama.prefill(_tokens(20), REFERENCE)[0]
    assert not torch.equal(llama.prefill(_tokens(20), cfg)[0], fp)


# --- decode_batched == literal decode steps ----------------------------------------------------------
BFP4_LOFI = Config(**{g: "bfp4" for g in ("ff1_3", "ff2", "wqkv", "wo", "kv_cache")},
                   **{op: "lofi" for op in ("li_ff1_3", "li_ff2", "li_qkv_decode", "li_o_decode", "sdpa_decode",
                                             "li_qkv_prefill", "li_o_prefill", "sdpa_prefill")})
CONFIGS = {
    "performance": performance("tiny-llama"),
    "bfp4-lofi": BFP4_LOFI,
    "act-bfp8": DEFAULT.replace(activation="bfp8"),
    "kv-bfp4": DEFAULT.replace(kv_cache="bfp4"),
    "per-layer": ModelConfig((performance("x"), DEFAULT.replace(activation="bf16", sdpa_decode="hifi4", ff2="bfp4"))),
    "hifi3": DEFAULT.replace(li_ff1_3="hifi3", sdpa_decode="hifi3"),
    "approx-sdpa": DEFAULT.replace(sdpa_decode="hifi2", sdpa_prefill="hifi4fp32"),  # SFPU exp / recip
    # full-precision activations, fp32 weights, exact matmuls and fp32 logits: nothing hides
    # BLAS's summation order in the last bits (fails if decode rows are not padded to a tile,
    # since BLAS takes another kernel for a single row)
    "full-precision": REFERENCE.replace(kv_cache="bfp8", li_ff2="hifi2"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_batched_equals_steps(llama, name):
    cfg = CONFIGS[name]
    toks = _tokens(61, seed=3)
    _, cache = llama.prefill(toks[:21], cfg)
    c1, c2 = cache, cache.clone()
    batched = llama.decode_batched(toks[21:], c1, cfg)  # 40 rows: two tiles of rows
    steps = torch.stack([llama.decode_step(int(t), c2, cfg) for t in toks[21:]])
    assert batched.shape == (40, VOCAB) and torch.isfinite(batched).all()
    assert torch.equal(batched, steps)
    assert c1.length == c2.length == 61
    assert all(torch.equal(a, b) for a, b in zip(c1.kt + c1.v, c2.kt + c2.v))


def test_decode_split_calls_and_cache_growth(llama):
    """Two decode_batched calls equal one; a cache that must grow keeps working."""
    cfg = performance("x")
    toks = _tokens(40, seed=5)
    _, c = llama.prefill(toks[:8], cfg, capacity=64)
    one = llama.decode_batched(toks[8:], c.clone(), cfg)
    two = torch.cat([llama.decode_batched(toks[8:20], c, cfg), llama.decode_batched(toks[20:], c, cfg)])
    assert torch.equal(one, two)
    _, small = llama.prefill(toks[:8], cfg, capacity=8)
    grown = llama.decode_batched(toks[8:], small, cfg)
    assert small.capacity >= 40 and small.length == 40 and torch.isfinite(grown).all()


# --- op groups ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["li_qkv", "li_o", "sdpa"])
def test_prefill_and_decode_use_their_own_op_groups(llama, op):
    base = DEFAULT
    toks = _tokens(40, seed=7)
    p0, cache = llama.prefill(toks[:24], base, logits_for="all")
    d0 = llama.decode_batched(toks[24:], cache.clone(), base)
    other = "lofi"
    dec_changed = base.replace(**{f"{op}_decode": other})
    pre_changed = base.replace(**{f"{op}_prefill": other})
    p1, c1 = llama.prefill(toks[:24], dec_changed, logits_for="all")
    assert torch.equal(p1, p0)  # prefill ignores the decode group
    assert not torch.equal(llama.decode_batched(toks[24:], cache.clone(), dec_changed), d0)
    p2, _ = llama.prefill(toks[:24], pre_changed, logits_for="all")
    assert not torch.equal(p2, p0)
    assert torch.equal(llama.decode_batched(toks[24:], cache.clone(), pre_changed), d0)  # decode ignores it


def test_every_setting_carries_the_one_table_record():
    from engine.numerics import fidelity
    from engine.vocab.config import FidelitySetting

    assert [s.value for s in FidelitySetting] == list(fidelity.SETTINGS)  # one table, same order
    for s in FidelitySetting:
        assert s.kernel is fidelity.SETTINGS[s.value].kernel
    x, w = torch.randn(32, 64), torch.randn(64, 48)
    assert torch.equal(mm(FidelitySetting.EXACT, x, w), x @ w)
    h3 = FidelitySetting.HIFI3.kernel
    assert (h3.phases, h3.approx, h3.fp32_dest, h3.packer_l1_acc) == (3, False, True, True)
    assert FidelitySetting.HIFI2.kernel.approx and not FidelitySetting.HIFI2_NA.kernel.approx
    assert not torch.equal(mm(FidelitySetting.LOFI, x, w), x @ w)


# --- output-dtype rules ----------------------------------------------------------------------------------
def _device_roundings(model, monkeypatch, run):
    calls = []
    real = em.rnd
    monkeypatch.setattr(em, "rnd", lambda x, f, *a: calls.append((tuple(x.shape), f)) or real(x, f, *a))
    run()
    monkeypatch.setattr(em, "rnd", real)
    return calls


@pytest.mark.parametrize("act", [None, "bf16", "bfp8"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_activation_output_rules(llama, monkeypatch, act, mode):
    """tt_transformers' output dtypes (decoder.py, model.py, attention.py, mlp.py, lm_head.py): a forced
    activation reaches the layer input, both norms, both residual adds and the LM head's input;
    decode Q, SDPA output and wo output stay bf16; mixed keeps each op's default."""
    cfg = DEFAULT.replace(activation=act)
    toks = _tokens(28, seed=9)
    _, cache = llama.prefill(toks[:20], cfg)
    if mode == "prefill":
        calls = _device_roundings(llama, monkeypatch, lambda: llama.prefill(toks[:20], cfg))
        M = 20
    else:
        calls = _device_roundings(llama, monkeypatch, lambda: llama.decode_batched(toks[20:], cache, cfg))
        M = 32  # decode rows are padded to a tile
    prefill = mode == "prefill"
    per_layer = lambda shape: [f for s, f in calls if s == shape]  # noqa: E731
    a = act or "bf16"  # "activation or bf16"
    q = act or "bfp8" if prefill else "bf16"  # Q, SDPA output, wo output
    # the qkv linear's output
    assert per_layer((M, HIDDEN + 2 * KV_HEADS * HEAD_DIM)) == [a] * LAYERS
    # RoPE of the q and k heads: x*cos, rot*sin and their sum, each bf16
    assert per_layer((M, HEADS + KV_HEADS, HEAD_DIM)) == ["bf16"] * 3 * LAYERS
    assert per_layer((M, HEADS, HEAD_DIM)) == [q] * LAYERS  # Q before attention
    assert per_layer((M, KV_HEADS, HEAD_DIM)) == ["bfp8", "bfp8"] * LAYERS  # K and V into the cache
    # w1 | w3 outputs (one fused tensor), then SiLU(w1) in w1's dtype, then SiLU(w1) * w3
    assert per_layer((M, 2 * INTER)) == [a] * LAYERS
    assert per_layer((M, INTER)) == [a, act or "bfp8"] * LAYERS
    # [M, HIDDEN] per layer: input typecast, norm, SDPA out, wo out, residual, norm, w2 out, residual
    layer = [a, a, q, q, a, a, a, a]
    # embedding (before any padding) first; final norm (in the last layer's dtype) last
    if prefill:
        expect = {(20, HIDDEN): ["bf16"] + layer * LAYERS, (32, HIDDEN): [a]}
    else:
        expect = {(8, HIDDEN): ["bf16"], (32, HIDDEN): layer * LAYERS + [a]}
    assert {s: per_layer(s) for s in expect} == expect
    assert per_layer((1 if prefill else 8, VOCAB)) == ["bfp8"]  # logits of the real rows (prefill: the last)
    L = 20 if prefill else 64  # keys: the prefill's tokens / the cache's capacity (one SDPA chunk here)
    assert per_layer((KV_HEADS, HEADS // KV_HEADS * M, L)) == ["bf16", "bf16"] * LAYERS  # scores S, then P


def test_mixed_product_path_differs_from_bf16(llama):
    toks = _tokens(30, seed=11)
    _, cache = llama.prefill(toks[:20], DEFAULT)
    mixed = llama.decode_batched(toks[20:], cache.clone(), DEFAULT)
    bf16 = llama.decode_batched(toks[20:], cache.clone(), DEFAULT.replace(activation="bf16"))
    assert not torch.equal(mixed, bf16)  # in decode only SiLU(w1)*w3 differs (bfp8 vs bf16)


# --- weights: orientation, fusion and caching ---------------------------------------------------------
def test_weights_stored_in_tt_orientation(llama):
    w = llama.w
    wq = w["model.layers.0.self_attn.q_proj.weight"]
    fused = llama.weight("0.wqkv", "bfp8")
    assert fused.dtype == torch.bfloat16 and llama.weight("0.wqkv", "fp32").dtype == torch.float32
    fused = fused.float()
    assert fused.shape == (HIDDEN, HIDDEN + 2 * KV_HEADS * HEAD_DIM)
    # q (and k) rows in Meta's interleaved-pair order, as tt_transformers' convert_hf_to_meta stores them
    assert torch.equal(fused[:, :HIDDEN], formats.quantize(em.to_meta(wq, HEAD_DIM).T.contiguous(), "bfp8", "host"))
    assert not torch.equal(em.to_meta(wq, HEAD_DIM), wq)
    assert torch.equal(em.to_meta(wq, HEAD_DIM)[1], wq[HEAD_DIM // 2])  # row 1 of a head = row 0 of its 2nd half
    w13 = llama.weight("1.w13", "bfp4").float()
    assert torch.equal(w13[:, INTER:], formats.quantize(w["model.layers.1.mlp.up_proj.weight"].T.contiguous(), "bfp4"))
    assert torch.equal(llama.weight("lm_head", "bfp8").float(), formats.quantize(w["model.embed_tokens.weight"].T.contiguous(), "bfp8"))


def test_quantized_weights_cached(monkeypatch):
    _, spec, sd = _tiny("qwen2")
    model = Model(spec, sd)
    host = []
    real = formats.quantize
    monkeypatch.setattr(formats, "quantize", lambda x, f, rounding="host", **kw: (rounding == "host" and host.append(f)) or real(x, f, rounding, **kw))
    toks = _tokens(30)

    def trial(cfg):
        _, c = model.prefill(toks[:16], cfg)
        model.decode_batched(toks[16:], c, cfg)

    trial(DEFAULT)
    # per layer: wqkv, bias, wo, w1, w3, w2, two norms; then the final norm and the LM head
    assert len(host) == 8 * LAYERS + 2
    n = len(host)
    trial(DEFAULT)
    trial(DEFAULT.replace(li_ff2="lofi", activation="bfp8"))  # no new formats
    assert len(host) == n
    trial(DEFAULT.replace(ff2="bfp4"))
    assert host[n:] == ["bfp4"] * LAYERS


# --- per-layer configs ---------------------------------------------------------------------------------
def test_per_layer_configs_apply_per_layer(llama):
    toks = _tokens(30, seed=13)
    uni = ModelConfig.uniform(DEFAULT, LAYERS)
    l1 = ModelConfig((DEFAULT, DEFAULT.replace(ff2="bfp4")))
    llama.clear_cache()
    p0, c0 = llama.prefill(toks[:20], uni, logits_for="all")
    p1, c1 = llama.prefill(toks[:20], l1, logits_for="all")
    assert not torch.equal(p0, p1)
    assert ("1.w2", "bfp4") in llama._cache and ("0.w2", "bfp4") not in llama._cache
    # a plain Config applies to every layer
    assert torch.equal(llama.prefill(toks[:20], DEFAULT, logits_for="all")[0], p0)
    with pytest.raises(ConfigError, match="3 layers"):
        llama.prefill(toks[:20], ModelConfig.uniform(DEFAULT, 3))


def test_per_layer_config_changes_only_later_layers(llama):
    """Changing layer 1's ff2 leaves layer 0's K/V and layer 1's K/V (computed before its MLP) equal."""
    toks = _tokens(20, seed=17)
    _, c0 = llama.prefill(toks, ModelConfig.uniform(DEFAULT, LAYERS))
    _, c1 = llama.prefill(toks, ModelConfig((DEFAULT, DEFAULT.replace(ff2="bfp4"))))
    _, c2 = llama.prefill(toks, ModelConfig((DEFAULT.replace(ff2="bfp4"), DEFAULT)))
    assert all(torch.equal(a, b) for a, b in zip(c0.kt + c0.v, c1.kt + c1.v))
    assert torch.equal(c0.kt[0], c2.kt[0]) and not torch.equal(c0.kt[1], c2.kt[1])


def test_sdpa_exp_is_exact_unless_asked_recip_follows_approx(llama, monkeypatch):
    """tt_transformers runs SDPA's exp in exact mode (exp_approx_mode=False) whatever the setting;
    the softmax's reciprocal follows the setting's math_approx_mode; `sdpa_exp_approx=True` also
    switches the exp to the SFPU's (and keeps the batched-decode equivalence)."""
    from engine.numerics import fidelity

    toks = _tokens(48, seed=5)
    approx_on = DEFAULT.replace(sdpa_prefill="hifi4fp32", sdpa_decode="hifi2")  # approx mode on
    a = llama.prefill(toks, approx_on, logits_for="all")[0]
    b = llama.prefill(toks, approx_on.replace(sdpa_prefill="hifi4"), logits_for="all")[0]
    assert not torch.equal(a, b)  # the approximate reciprocal
    real = fidelity.recip
    monkeypatch.setattr(fidelity, "recip", lambda x, approx=False: real(x, False))
    assert torch.equal(llama.prefill(toks, approx_on, logits_for="all")[0], b)  # and nothing else
    monkeypatch.setattr(fidelity, "recip", real)
    sfpu = Model(llama.spec, llama.w, sdpa_exp_approx=True)
    c = sfpu.prefill(toks, approx_on, logits_for="all")[0]
    assert not torch.equal(a, c)
    _, cache = sfpu.prefill(toks[:20], approx_on)
    c1, c2 = cache, cache.clone()
    batched = sfpu.decode_batched(toks[20:], c1, approx_on)
    steps = torch.stack([sfpu.decode_step(int(t), c2, approx_on) for t in toks[20:]])
    assert torch.equal(batched, steps)
