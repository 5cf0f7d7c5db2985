"""tt_transformers' op-level numerics that engine.models.model follows (docs/NUMERICS.md): program configs
(K blocks), flash SDPA with bf16 statistics, bf16 RoPE, the SFPU SiLU, Qwen's bias order, tensor-
parallel rounding per device, the LM head. Hand-built vectors and independent reference code."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import engine.models.model as em
from engine.models import programs
from engine.models.spec import ModelSpec
from engine.numerics import fidelity, formats
from engine.vocab.config import DEFAULT, FidelitySetting


def bf16(t):
    return torch.as_tensor(t, dtype=torch.float32).bfloat16().float()


pytestmark = pytest.mark.usefixtures("one_thread")


# --- program configs: in0_block_w per linear (model_config.py) --------------------------------------
SMOL = ModelSpec("SmolLM2-135M", "llama", 30, 576, 9, 3, 64, 1536, 49152)
LLAMA_1B = ModelSpec("Llama3.2-1B", "llama", 16, 2048, 32, 8, 64, 8192, 128256)


@pytest.mark.parametrize("spec,tp,topo,prefill,tiles", [
    # in0_block_w per (qkv, wo, w1/w3, w2, lm_head), computed by hand from the formulas
    (SMOL, 1, "single", False, (1, 2, 3, 8, 1)),  # qkv: find_grid(18)=3x6 -> 576/(32*18)=1; w2: 48/6=8
    (SMOL, 1, "single", True, (1, 3, 3, 6, 1)),  # prefill qkv in0_block_w=1; wo: (8,6) grid -> 18/6=3
    (LLAMA_1B, 1, "single", False, (2, 2, 1, 4, 1)),  # w1/w3: 64 cores -> 64/64=1; w2: 256/64=4
    (LLAMA_1B, 1, "single", True, (1, 8, 8, 8, 1)),
    (LLAMA_1B, 2, "line", False, (2, 2, 1, 2, 1)),  # wo K=1024/chip on 16 cores; w2 128/64=2
    (LLAMA_1B, 2, "line", True, (1, 4, 8, 8, 1)),
])
def test_in0_block_w_per_linear(spec, tp, topo, prefill, tiles):
    b = programs.blocks(spec, tp, prefill, topo)
    assert (b.qkv, b.wo, b.w13, b.w2, b.lm_head) == tuple(32 * t for t in tiles)


def test_layout_rules():
    assert programs.wo_fused(LLAMA_1B, 8, "ring")  # (2048/32/8) % 8 == 0: all-gather matmul, wo split on N
    assert not programs.wo_fused(ModelSpec("Llama3.2-3B", "llama", 28, 3072, 24, 8, 128, 8192, 128256), 8, "ring")
    assert not programs.wo_fused(LLAMA_1B, 2, "line")
    with pytest.raises(programs.Unsupported, match="9.*not divisible by 2"):
        programs.check_tp(SMOL, 2)
    assert programs.largest_divisor(18) == 6 and programs.largest_divisor(7) == 7 and programs.largest_divisor(11) == 1
    assert programs.find_grid(18) == (3, 6) and programs.lm_head_cores(576) == 18


# --- SDPA: flash over K chunks, bf16 statistics (sdpa_program_factory) --------------------------------
def flash_ref(q, k, v, mask, chunk, scale):
    """Independent flash-attention reference, one head, numpy + bf16 rounding at every stored value:
    S, running max m, P = exp((S - m) * scale), l, O = P @ V (exact here: HiFi4 on bf16 data,
    fp32 dest), rescale by exp((m_old - m) * scale), out = O * (1 / l)."""
    rb = lambda a: bf16(torch.from_numpy(np.asarray(a, np.float32))).numpy()  # noqa: E731
    L = k.shape[0]
    m = l = o = None
    for c0 in range(0, L, chunk):
        s = rb(q @ k[c0:c0 + chunk].T) + mask[:, c0:c0 + chunk]
        m_new = s.max(-1, keepdims=True) if m is None else np.maximum(m, s.max(-1, keepdims=True))
        p = rb(np.exp((s - m_new) * scale))
        lc, oc = rb(p.sum(-1, keepdims=True)), rb(p @ v[c0:c0 + chunk])
        if m is None:
            l, o = lc, oc
        else:
            alpha = rb(np.exp((m - m_new) * scale))
            l, o = rb(rb(l * alpha) + lc), rb(rb(o * alpha) + oc)
        m = m_new
    return o * rb(1.0 / l)


def _sdpa_model():
    spec = ModelSpec("t", "llama", 1, 64, 1, 1, 64, 64, 32)
    w = {k: torch.zeros(s) for k, s in [("model.embed_tokens.weight", (32, 64)), ("model.norm.weight", (64,)),
                                         ("lm_head.weight", (32, 64))]}
    p = "model.layers.0."
    w |= {p + n: torch.zeros(64) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
    w |= {p + f"self_attn.{n}_proj.weight": torch.zeros(64, 64) for n in "qkvo"}
    w |= {p + f"mlp.{n}_proj.weight": torch.zeros(64, 64) for n in ("gate", "up", "down")}
    return em.Model(spec, w)


def test_sdpa_chunked_with_bf16_stats_equals_the_flash_reference():
    g = torch.Generator().manual_seed(0)
    M, L, D = 8, 200, 64
    q, k, v = (bf16(torch.randn(n, D, generator=g) * 2) for n in (M, L, L))
    mask = torch.zeros(M, L)
    mask[:, 150:] = float("-inf")  # the last chunk partly masked, one chunk fully masked
    model = _sdpa_model()
    got = model._sdpa(q[:, None], k.T[None], v[None], mask, FidelitySetting.HIFI4, "bf16", 64)
    ref = flash_ref(q.numpy(), k.numpy(), v.numpy(), mask.numpy(), 64, 0.125)
    assert np.allclose(got.numpy(), ref, rtol=2**-7, atol=2**-7)
    assert np.mean(bf16(torch.from_numpy(ref)).numpy() == got.numpy()) > 0.95
    whole = model._sdpa(q[:, None], k.T[None], v[None], mask, FidelitySetting.HIFI4, "bf16", L)
    assert not torch.equal(got, whole)  # chunking with bf16 statistics changes results
    exact = torch.softmax(q @ k.T * 0.125 + mask, -1) @ v
    full = model._sdpa(q[:, None], k.T[None], v[None], mask, FidelitySetting.EXACT, em.FULL, L)
    assert torch.allclose(full, exact, rtol=1e-5, atol=1e-5)  # full precision: plain softmax attention


def test_sdpa_scale_is_truncated_to_bf16():
    # scale_bf16 = scale_fp32 >> 16: 1/sqrt(80) = 0.1118034 truncates to 0.111328125 (nearest: 0.11181640625)
    assert em.sdpa_scale(80) == 0.111328125 and em.sdpa_scale(48) == 0.1435546875
    assert em.sdpa_scale(64) == 0.125 and em.sdpa_scale(80, full=True) == 1 / math.sqrt(80)


# --- RoPE (rope.py: bf16 tables; rotary_embedding_llama: bf16 dest) -----------------------------------
def test_rope_tables_bf16_and_each_product_rounded():
    model = _sdpa_model()
    cos, sin = model._table(False, 40, "bf16")
    assert torch.equal(cos, bf16(cos)) and torch.equal(sin, bf16(sin))
    g = torch.Generator().manual_seed(1)
    x = bf16(torch.randn(40, 2, 64, generator=g))
    pos = torch.arange(40)
    c, s = cos[pos][:, None], sin[pos][:, None]
    got = model._rope_apply(x, (c, s), "bf16")
    rot = x.reshape(40, 2, 32, 2).flip(-1).reshape(40, 2, 64)  # Meta pairs: (x1, x0)
    assert torch.equal(got, bf16(bf16(x * c) + bf16(rot * s)))
    # the pair (2i, 2i+1) rotates by frequency i: out[2i] = x[2i] cos - x[2i+1] sin
    assert torch.equal(s[:, :, 0], -s[:, :, 1]) and torch.equal(c[:, :, 0], c[:, :, 1])


# --- SFPU SiLU (ckernel_sfpu_silu.h, seed era) ---------------------------------------------------------
def test_sfpu_piecewise_silu_hand_values():
    x = torch.tensor([0.5, -0.5, 2.0, -2.0, 6.0, -6.0, 0.0])
    poly = lambda t: (((0.00144462 * t - 0.01055479) * t - 0.01203685) * t + 0.24300185) * t + 0.50437757  # noqa: E731
    want = torch.tensor([0.5 * (0.229 * 0.5 + 0.5), -0.5 * (1 - (0.229 * 0.5 + 0.5)), 2 * poly(2.0),
                         -2 * (1 - poly(2.0)), 6.0, -0.0, 0.0])
    assert torch.allclose(fidelity.silu_piecewise(x), want, rtol=1e-6, atol=1e-7)
    t = torch.linspace(-8, 8, 160001)
    err = (fidelity.silu_piecewise(t) / torch.where(t == 0, 1, t) - torch.sigmoid(t)).abs().max()
    assert 0.0080 < float(err) < 0.0090  # the documented max sigmoid error 0.0087 (at |x| -> 5)
    assert fidelity.silu_fn("exact") is torch.nn.functional.silu
    with pytest.raises(ValueError, match="sfpu-piecewise"):
        fidelity.silu_fn("fast")


def test_model_uses_the_chosen_silu():
    from engine.models import loaders

    ld = loaders.load("tiny-llama")
    toks = torch.arange(20) % 256
    a = em.Model(ld.spec, ld.weights).prefill(toks, DEFAULT)[0]
    b = em.Model(ld.spec, ld.weights, silu="exact").prefill(toks, DEFAULT)[0]
    assert not torch.equal(a, b) and em.DEFAULT_SILU == "sfpu-piecewise"


# --- Qwen's qkv bias: added after the qkv output is rounded (attention.py) ----------------------------
def test_qwen_bias_added_after_rounding(monkeypatch):
    from engine.models import loaders

    ld = loaders.load("tiny-qwen2")
    model = em.Model(ld.spec, ld.weights)
    seen = []
    real = em.rnd
    qkv_n = (ld.spec.n_heads + 2 * ld.spec.n_kv_heads) * ld.spec.head_dim

    def spy(x, f, *a):
        out = real(x, f, *a)
        if x.shape[-1] == qkv_n:
            seen.append((x.clone(), out))
        return out

    monkeypatch.setattr(em, "rnd", spy)
    model.prefill(torch.arange(16), DEFAULT.replace(activation="bfp8"))
    (_, rounded), (biased_in, _) = seen[0], seen[1]
    bias = model.weight("0.bqkv", "bf16")
    assert torch.equal(biased_in, rounded + bias)  # the bias meets the already-rounded output


# --- tensor parallel: K split, per-chip rounding, sum in the output dtype (tt/ccl.py) -----------------
def test_tp_linear_rounds_each_chip_and_sums_in_the_output_dtype():
    model = _sdpa_model()
    g = torch.Generator().manual_seed(2)
    x, w = bf16(torch.randn(32, 128, generator=g)), bf16(torch.randn(128, 64, generator=g))
    setting = FidelitySetting.HIFI2
    got = model._linear(setting, x, w, None, "bfp8", None, split=2)
    p0 = formats.quantize(em.mm(setting, x[:, :64], w[:64]), "bfp8", "device")
    p1 = formats.quantize(em.mm(setting, x[:, 64:], w[64:]), "bfp8", "device")
    assert torch.equal(got, formats.quantize(p0 + p1, "bfp8", "device"))
    assert not torch.equal(got, model._linear(setting, x, w, None, "bfp8", None))


def test_accuracy_depends_on_the_device():
    from engine.accuracy.evaluator import Evaluator

    n150 = Evaluator("tiny-llama", prefill=16, decode=15)
    n300 = Evaluator("tiny-llama", prefill=16, decode=15, device="N300")
    assert (n150.layout, n300.layout) == ((1, 1), (2, 2))
    assert not torch.equal(n150.run(DEFAULT), n300.run(DEFAULT))
    with pytest.raises(ValueError, match="Galaxy"):
        Evaluator("tiny-llama", prefill=16, decode=15, device="TG")
    with pytest.raises(ValueError, match="Blackhole numerics are not modelled"):
        Evaluator("tiny-llama", prefill=16, decode=15, device="P150")  # the device table's `numerics` says why
    with pytest.raises(ValueError, match="not divisible by 8"):
        Evaluator("tiny-llama", prefill=16, decode=15, device="T3K")  # 4 heads over 8 chips


# --- LM head (tt/lm_head.py): bfp8 weights, hifi2fp16, bfp8 logits ------------------------------------
def test_lm_head_defaults():
    assert em.LM_HEAD == ("bfp8", "hifi2fp16")
    k = FidelitySetting.HIFI2_FP16.kernel
    assert (k.phases, k.fp32_dest, k.packer_l1_acc) == (2, False, True)
    model = _sdpa_model()
    assert (model.lm_head_format, model.lm_head_setting.value, model.logits_format) == ("bfp8", "hifi2fp16", "bfp8")


def test_numerics_doc_names_existing_tests_and_engine_functions():
    """docs/NUMERICS.md cannot go stale: every test it names exists, every engine module it names too."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "NUMERICS.md").read_text()
    tests = "\n".join(p.read_text() for p in (root / "tests").glob("test_*.py"))
    names = set(re.findall(r"`(?:test_\w+\.py::)?(test_[a-z0-9_]+)`", doc)) | set(re.findall(r"(test_[a-z0-9_]+) \(", doc))
    assert len(names) > 25
    missing = [n for n in names if f"def {n}" not in tests]
    assert not missing, missing
    for mod in set(re.findall(r"`(?:engine\.(?:\w+\.)?)?(fidelity|formats|programs|model|config|evaluator)\.", doc)):
        assert list((root / "engine").glob(f"*/{mod}.py")), mod


def test_device_facts_come_from_the_device_table():
    """The program configs' grid and the perf model's prefill block are the device table's, not constants."""
    from engine.perf.model import predict
    from engine.vocab.devices import DEVICES, emulated_devices, numerics_chip

    assert programs.GRID == numerics_chip().grid == DEVICES["N150"].chip.grid == (8, 8)
    assert programs.lm_head_cores(576) == 6 * 3 and programs.lm_head_cores(2048) == 64  # from 8x8 down
    assert emulated_devices() == ("N150", "N300", "T3K")
    assert (DEVICES["N150"].chip.prefill_block_rows, DEVICES["P150"].chip.prefill_block_rows) == (1024, 512)
    # the weights are re-read per block of prefill rows: a smaller block in the table costs TTFT
    from dataclasses import replace

    n150 = DEVICES["N150"]
    half = replace(n150, chip=replace(n150.chip, prefill_block_rows=512))
    assert predict("Llama3.2-1B", half, prefill=4096).ttft_ms > predict("Llama3.2-1B", n150, prefill=4096).ttft_ms


def test_t3k_fused_wo_runs_at_hifi2_in_decode_and_prefill_blocks_use_the_chip_width():
    """tt/attention.py: on a ring whose (dim / 32 / tp) % tp == 0, decode wo is the all_gather_matmul
    with compute_kernel_config_hifi2 (fp32 dest, fp32 partials) whatever li_o_decode says; prefill
    runs no all-gather-matmul, so wo's K block is the chip's attention width."""
    from engine.models.loaders import expected_shapes
    from engine.models.spec import ModelSpec

    spec = ModelSpec("fused", "llama", n_layers=1, hidden=2048, n_heads=16, n_kv_heads=8, head_dim=128,
                     intermediate=256, vocab=64, tied_embeddings=True)
    assert programs.wo_fused(spec, 8, "ring") and not programs.wo_fused(spec, 2, "line")
    blk = programs.blocks(spec, 8, prefill=True, topology="ring")
    per_chip = spec.n_heads * spec.head_dim // 8
    assert blk.wo == programs.matmul_in0_block_w(per_chip, programs.find_prefill_grid(8, per_chip // 32)) * 32
    g = torch.Generator().manual_seed(0)
    w = {k: (torch.ones(s) if len(s) == 1 else 0.05 * torch.randn(s, generator=g)) for k, s in expected_shapes(spec).items()}

    def decode(li_o: str, tp: int, topology: str) -> torch.Tensor:
        m = em.Model(spec, w, tp=tp, topology=topology)
        cfg = DEFAULT.replace(li_o_decode=li_o)
        _, cache = m.prefill(torch.arange(1, 9), cfg)
        return m.decode_batched(torch.arange(9, 13), cache, cfg)

    assert torch.equal(decode("lofi", 8, "ring"), decode("hifi4", 8, "ring"))  # the setting is not read
    assert not torch.equal(decode("lofi", 2, "line"), decode("hifi4", 2, "line"))  # N300 reads it
