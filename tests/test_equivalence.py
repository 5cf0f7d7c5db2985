"""Numerics equivalence of configs (sweep.equivalence), checked against the engine bit for bit."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from engine.vocab.config import DEFAULT, Config, FidelitySetting, ModelConfig, OpGroup, TensorGroup
from sweep.equivalence import (
    _SRC_B_MIXED,
    SRC_A,
    numerics_digest,
    numerics_key,
    phase_vector,
    representatives,
)

FIDS = [f for f in FidelitySetting if f is not FidelitySetting.EXACT]
F = FidelitySetting


def key_of(**kw):
    return numerics_key(Config(**kw))


# --- the rules -----------------------------------------------------------------------------------
def test_phase_vector_reads_the_settings_table():
    from engine.numerics import fidelity

    c = Config(li_ff1_3="lofi", li_ff2="hifi3", sdpa_decode="hifi4fp32")
    v = phase_vector(c)
    assert v[list(OpGroup).index(OpGroup.LI_FF1_FF3)] == fidelity.SETTINGS["lofi"].kernel.phases == 1
    assert v[list(OpGroup).index(OpGroup.LI_FF2)] == 3 and v[list(OpGroup).index(OpGroup.SDPA_DECODE)] == 4


def test_bfp4_weights_lofi_equals_hifi2fp16():
    # bfp4 weights: phase 1 (SrcA's next 3 bits) is zero; both settings use 16-bit dest + L1 acc
    assert key_of(ff1_3="bfp4", li_ff1_3="lofi") == key_of(ff1_3="bfp4", li_ff1_3="hifi2fp16")
    assert key_of(wo="bfp4", li_o_decode="lofi") == key_of(wo="bfp4", li_o_decode="hifi2fp16")
    # ... but not with bfp8 weights (bits 5-6 matter), nor against hifi2 (fp32 dest) or hifi2na (no L1 acc)
    assert key_of(ff1_3="bfp8", li_ff1_3="lofi") != key_of(ff1_3="bfp8", li_ff1_3="hifi2fp16")
    assert key_of(ff1_3="bfp4", li_ff1_3="lofi") != key_of(ff1_3="bfp4", li_ff1_3="hifi2")
    assert key_of(ff1_3="bfp4", li_ff1_3="lofi") != key_of(ff1_3="bfp4", li_ff1_3="hifi2na")


def test_hifi3_equals_hifi4_for_bfp4_weights():
    # bfp4 weights: phase 3 (SrcA next 3 bits x SrcB bit 7) is zero, HiFi3 == HiFi4 (fp32 dest both)
    assert key_of(ff1_3="bfp4", li_ff1_3="hifi3") == key_of(ff1_3="bfp4", li_ff1_3="hifi4")
    assert key_of(ff1_3="bfp4", li_ff1_3="hifi3") == key_of(ff1_3="bfp4", li_ff1_3="hifi4fp32")
    assert key_of(kv_cache="bfp4", sdpa_decode="hifi3") == key_of(kv_cache="bfp4", sdpa_decode="hifi4")
    # ... but hifi4fp32's approx mode changes the SDPA softmax's reciprocal
    assert key_of(kv_cache="bfp4", sdpa_decode="hifi3") != key_of(kv_cache="bfp4", sdpa_decode="hifi4fp32")
    # bfp8 / bf16 weights keep bits 5-7 in phase 3
    assert key_of(ff1_3="bfp8", li_ff1_3="hifi3") != key_of(ff1_3="bfp8", li_ff1_3="hifi4")
    assert key_of(ff1_3="bfp4", li_ff1_3="hifi3") != key_of(ff1_3="bfp4", li_ff1_3="hifi2")


def test_approx_mode_matters_only_for_sdpa():
    for op in ("li_ff1_3", "li_ff2", "li_qkv_decode", "li_o_decode", "li_qkv_prefill", "li_o_prefill"):
        assert key_of(**{op: "hifi4"}) == key_of(**{op: "hifi4fp32"}), op
    for op in ("sdpa_decode", "sdpa_prefill"):  # the softmax's reciprocal follows math_approx_mode
        assert key_of(**{op: "hifi4"}) != key_of(**{op: "hifi4fp32"}), op
        a, b = (DEFAULT.replace(**{op: f}) for f in ("hifi4", "hifi4fp32"))
        assert numerics_key(a, sdpa_exp_approx=True) != numerics_key(a), op


def test_bfp8_silu_product_has_no_seventh_bit():
    # w2's input is the SiLU product, bfp8 under activation mixed / bfp8: HiFi2 == HiFi3 == HiFi4
    for act in (None, "bfp8"):
        keys = {key_of(activation=act, li_ff2=f) for f in ("hifi2", "hifi3", "hifi4", "hifi4fp32")}
        assert len(keys) == 1, act
        assert key_of(activation=act, li_ff2="hifi2") != key_of(activation=act, li_ff2="hifi2fp16")
    # a bf16 product has its 7th bit: HiFi2 != HiFi3 != HiFi4
    keys = {key_of(activation="bf16", li_ff2=f) for f in ("hifi2", "hifi3", "hifi4")}
    assert len(keys) == 3
    # w1/w3 and qkv read a norm output: in the forced activation's dtype (bfp8: no 7th bit), else bf16
    assert key_of(activation="bfp8", li_ff1_3="hifi2") == key_of(activation="bfp8", li_ff1_3="hifi4")
    assert key_of(activation="bfp8", li_qkv_prefill="hifi2") == key_of(activation="bfp8", li_qkv_prefill="hifi4")
    assert key_of(activation=None, li_ff1_3="hifi2") != key_of(activation=None, li_ff1_3="hifi4")
    # wo in prefill reads the SDPA output in Q's dtype: bfp8 under mixed; decode wo reads bf16
    assert key_of(li_o_prefill="hifi2") == key_of(li_o_prefill="hifi4")
    assert key_of(li_o_decode="hifi2") != key_of(li_o_decode="hifi4")
    assert key_of(activation="bf16", li_o_prefill="hifi2") != key_of(activation="bf16", li_o_prefill="hifi4")


def test_device_layout_is_in_the_key():
    assert numerics_key(DEFAULT) == numerics_key(DEFAULT, layout=(1, 1))
    assert numerics_key(DEFAULT, layout=(2, 2)) != numerics_key(DEFAULT)
    assert numerics_key(DEFAULT, layout=(8, 1)) != numerics_key(DEFAULT, layout=(8, 8))
    assert numerics_digest(DEFAULT, layout=(2, 2)) != numerics_digest(DEFAULT)


def test_sdpa_kv_cache_is_the_weight_side():
    assert key_of(kv_cache="bfp4", sdpa_decode="lofi") == key_of(kv_cache="bfp4", sdpa_decode="hifi2fp16")
    assert key_of(kv_cache="bfp8", sdpa_decode="lofi") != key_of(kv_cache="bfp8", sdpa_decode="hifi2fp16")
    assert key_of(kv_cache="bfp4", sdpa_prefill="hifi2") != key_of(kv_cache="bfp4", sdpa_prefill="lofi")


def test_precisions_and_emulator_settings_always_count():
    assert key_of(ff1_3="bfp4") != key_of(ff1_3="bfp8")
    assert key_of(activation=None) != key_of(activation="bfp8")
    assert key_of(li_ff1_3="exact") != key_of(li_ff1_3="hifi4")
    assert key_of(ff1_3="fp32", li_ff1_3="hifi4") != key_of(ff1_3="fp32", li_ff1_3="hifi4fp32")


def test_per_layer_key_is_the_tuple_of_layer_keys():
    a = Config(ff1_3="bfp4", li_ff1_3="lofi")
    b = Config(ff1_3="bfp4", li_ff1_3="hifi2fp16")
    c = Config(ff1_3="bfp4", li_ff1_3="hifi2")
    assert numerics_key(ModelConfig((a, Config()))) == numerics_key(ModelConfig((b, Config())))
    assert numerics_key(ModelConfig((a, Config()))) != numerics_key(ModelConfig((c, Config())))
    assert numerics_key(ModelConfig((a, Config()))) != numerics_key(ModelConfig((Config(), a)))
    assert numerics_key(ModelConfig.uniform(a, 2)) == numerics_key(ModelConfig.uniform(b, 2))
    assert numerics_digest(ModelConfig.uniform(a, 2)) == numerics_digest(ModelConfig.uniform(b, 2))
    assert len(numerics_digest(a)) == 16


def test_representatives_keep_the_cheapest():
    cfgs = [Config(li_ff2=f) for f in ("hifi4", "hifi3", "hifi2", "hifi4fp32", "lofi")]
    red = representatives(cfgs)
    assert [cfgs[i].li_ff2.value for i in red.keep] == ["hifi2", "lofi"]
    assert red.n_skipped == 3
    assert all(cfgs[j].li_ff2 is F.HIFI2 for j in red.skipped.values())
    assert phase_vector(cfgs[2]) < phase_vector(cfgs[0])


def test_representatives_with_perf_costs():
    from engine.perf import model as perf

    def cost(c):
        r = perf.predict("tiny-llama", "N150", c)
        return [-r.speed_tsu, r.ttft_ms]

    cfgs = [Config(ff1_3="bfp4", li_ff1_3=f) for f in ("hifi2fp16", "lofi")]
    red = representatives(cfgs, cost)
    assert red.keep == [1] and red.skipped == {0: 1}
    # nothing to skip when the keys differ
    assert representatives([Config(), Config(ff2="bfp4")], cost).n_skipped == 0


def test_key_classes_are_coarser_than_identity():
    """Every pair of different configs in one key class differs only in fidelity settings."""
    rnd = random.Random(1)
    for _ in range(300):
        c = Config(**{op.value: rnd.choice(FIDS) for op in OpGroup},
                   **{g.value: rnd.choice(["bfp4", "bfp8", "bf16"]) for g in TensorGroup if g is not TensorGroup.ACTIVATION},
                   activation=rnd.choice([None, "bf16", "bfp8"]))
        op = rnd.choice(list(OpGroup))
        d = c.replace(**{op.value: rnd.choice(FIDS)})
        if numerics_key(c) == numerics_key(d):
            assert all(c.precision(g) == d.precision(g) for g in TensorGroup)


# --- against the engine: equal keys give bit-identical logits -------------------------------------
@pytest.fixture(scope="module")
def engine_run():
    from engine.accuracy.evaluator import Evaluator

    ev = Evaluator("tiny-llama", prefill=16, decode=15)
    model = ev.model
    cache: dict = {}

    def run(cfg: Config | ModelConfig):
        mc = ev.model_config(cfg)
        if mc not in cache:
            with torch.inference_mode():
                pre, kv = model.prefill(ev.tokens[:16], mc, logits_for="all")
                dec = model.decode_batched(ev.tokens[16:31], kv, mc)
            cache[mc] = (pre, dec)
        return cache[mc]

    return run


def _equal_key_pairs():
    """For every op group, SrcA precision and (for w2) activation: the settings with equal keys."""
    pairs = []
    for op in OpGroup:
        g = SRC_A[op].value
        acts = [None, "bf16", "bfp8"] if op in _SRC_B_MIXED else [None]
        for p, act in itertools.product(["bfp4", "bfp8", "bf16"], acts):
            groups: dict = {}
            for f in FIDS:
                c = Config(**{g: p, op.value: f, "activation": act})
                groups.setdefault(numerics_key(c), []).append(c)
            for members in groups.values():
                pairs += [(members[0], m) for m in members[1:]]
    return pairs


EQUAL_PAIRS = _equal_key_pairs()


def test_there_are_merges_to_check():
    assert len(EQUAL_PAIRS) >= 30


@pytest.mark.parametrize("a,b", EQUAL_PAIRS, ids=[f"{a.diff()}=={b.diff()}" for a, b in EQUAL_PAIRS])
def test_equal_keys_give_identical_logits(engine_run, a, b):
    assert numerics_key(a) == numerics_key(b)
    pa, da = engine_run(a)
    pb, db = engine_run(b)
    assert torch.equal(pa, pb), "prefill logits differ"
    assert torch.equal(da, db), "decode logits differ"


def test_equal_keys_per_layer_and_combined(engine_run):
    # several merges at once, and per-layer configs (tiny-llama has 2 layers)
    a = Config(ff1_3="bfp4", li_ff1_3="lofi", li_ff2="hifi4", wo="bfp4", li_o_decode="lofi",
               kv_cache="bfp4", sdpa_prefill="lofi", li_qkv_prefill="hifi4fp32")
    b = a.replace(li_ff1_3="hifi2fp16", li_ff2="hifi2", li_o_decode="hifi2fp16", sdpa_prefill="hifi2fp16",
                  li_qkv_prefill="hifi4")
    assert numerics_key(a) == numerics_key(b)
    assert torch.equal(engine_run(a)[1], engine_run(b)[1])
    ma, mb = ModelConfig((a, Config())), ModelConfig((b, Config()))
    assert numerics_key(ma) == numerics_key(mb)
    assert torch.equal(engine_run(ma)[1], engine_run(mb)[1])
    assert numerics_key(ma) != numerics_key(ModelConfig((Config(), a)))


def test_different_keys_for_known_different_numerics():
    pairs = [
        (Config(ff1_3="bfp8", li_ff1_3="lofi"), Config(ff1_3="bfp8", li_ff1_3="hifi2")),
        (Config(li_ff2="hifi2", activation="bf16"), Config(li_ff2="hifi4", activation="bf16")),
        (Config(sdpa_decode="hifi2"), Config(sdpa_decode="hifi2na")),
        (Config(ff1_3="bf16", li_ff1_3="hifi3"), Config(ff1_3="bf16", li_ff1_3="hifi4")),
        (Config(wqkv="bfp4", li_qkv_decode="hifi2"), Config(wqkv="bfp4", li_qkv_decode="hifi3")),
        (Config(li_o_prefill="hifi2fp16"), Config(li_o_prefill="hifi2na")),
    ]
    for a, b in pairs:
        assert numerics_key(a) != numerics_key(b), (a.diff(), b.diff())
