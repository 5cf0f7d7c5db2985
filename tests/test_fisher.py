"""engine.accuracy.fisher: Model.layer_forward against a whole trial, the fp32 activations and gradients,
and the Fisher scores of probes (tiny-llama, a short window)."""
from __future__ import annotations

import pytest
import torch

from engine.accuracy.evaluator import Evaluator, reference_model
from engine.accuracy.fisher import activations, fisher_profile, fisher_score
from engine.models.model import FULL
from engine.vocab.config import DEFAULT, REFERENCE, Config, ModelConfig

P, D = 32, 31
MIXED_ACT = Config.parse("precision_cfg = {ff1_3: bfp4, wqkv: bfp8, kv_cache: bfp8, activation: bfp8}, "
                         "fidelity_cfg = {li_ff1_3: lofi, sdpa_decode: hifi2na, li_qkv_prefill: hifi2}")
BFP4 = DEFAULT.replace(ff1_3="bfp4", li_ff1_3="lofi")
BF16 = DEFAULT.replace(ff1_3="bf16", li_ff1_3="hifi4")


@pytest.fixture(scope="module")
def ev(ttsweep_cache):
    return Evaluator("tiny-llama", prefill=P, decode=D)


def _record_layers(model, monkeypatch):
    """Wrap model._layer to log (layer, prefill?, input, input dtype, output, real rows) of every call."""
    log = []
    orig = model._layer

    def rec(i, c, h, h_fmt, n_real, cache, start, prefill, rope, mask):
        out, out_fmt = orig(i, c, h, h_fmt, n_real, cache, start, prefill, rope, mask)
        log.append((i, prefill, h[:n_real].clone(), h_fmt, out[:n_real].clone(), n_real))
        return out, out_fmt

    monkeypatch.setattr(model, "_layer", rec)
    return log


@pytest.mark.parametrize("which", ["defaults", "per-layer"])
def test_layer_forward_matches_a_trial_bit_for_bit(ev, monkeypatch, which):
    """Each layer alone, fed the trial's own layer inputs, gives the trial's layer outputs exactly."""
    model = ev.model
    mc = (ModelConfig.uniform(DEFAULT, ev.spec.n_layers) if which == "defaults"
          else ModelConfig((MIXED_ACT, BFP4)))
    log = _record_layers(model, monkeypatch)
    ev.run_two_pass(mc)  # model-major: the path layer_forward is checked against
    monkeypatch.undo()
    assert [(i, pf) for i, pf, *_ in log] == [(0, True), (1, True), (0, False), (1, False)]
    for layer in range(ev.spec.n_layers):
        (_, _, hp, fmt_p, yp, n_p), = [e for e in log if e[0] == layer and e[1]]
        (_, _, hd, fmt_d, yd, n_d), = [e for e in log if e[0] == layer and not e[1]]
        assert (n_p, n_d) == (P, D)
        assert fmt_p == fmt_d == model.input_format(mc, layer)
        got_p, got_d = model.layer_forward(layer, mc[layer], hp, hd, h_fmt=fmt_p)
        assert torch.equal(got_p, yp) and torch.equal(got_d, yd)
    if which == "per-layer":
        assert model.input_format(mc, 1) == "bfp8"  # layer 0's forced activation


def test_layer_forward_decode_depends_on_the_prefill_cache(ev):
    """The decode rows attend the prefill rows' K/V: changing the prefill input changes them."""
    g = torch.Generator().manual_seed(0)
    hp, hd = torch.randn(P, ev.spec.hidden, generator=g), torch.randn(D, ev.spec.hidden, generator=g)
    _, yd = ev.model.layer_forward(1, DEFAULT, hp, hd)
    _, yd2 = ev.model.layer_forward(1, DEFAULT, hp.flip(0), hd)  # not a scaling: RMSNorm ignores that
    assert not torch.equal(yd, yd2)


def test_layer_forward_refuses_bad_input(ev):
    h = torch.zeros(P, ev.spec.hidden)
    with pytest.raises(IndexError, match="out of range"):
        ev.model.layer_forward(ev.spec.n_layers, DEFAULT, h, h)
    with pytest.raises(ValueError, match="h_decode must be"):
        ev.model.layer_forward(0, DEFAULT, h, torch.zeros(D, 3))
    with pytest.raises(TypeError, match="Config"):
        ev.model.layer_forward(0, ModelConfig.uniform(DEFAULT, 2), h, h)


@pytest.fixture(scope="module")
def fp32_activations(ev):
    hf = reference_model(ev.loaded)
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf, activations(hf, torch.from_numpy(ev.reference.tokens.astype("int64")), P, D)


def test_engine_fp32_layer_matches_the_reference_on_its_inputs(ev, fp32_activations):
    """h[L+1] is layer L's fp32 output: the engine's REFERENCE layer reproduces it on h[L]."""
    _, act = fp32_activations
    assert len(act.h) == len(act.g) == ev.spec.n_layers
    assert act.h[0].shape == (P + D, ev.spec.hidden)
    y = torch.cat(ev.model.layer_forward(0, REFERENCE, act.h[0][:P], act.h[0][P:], h_fmt=FULL))
    torch.testing.assert_close(y, act.h[1], rtol=1e-5, atol=1e-5)


def test_gradients_are_the_nll_slope_at_the_layer_output(ev, fp32_activations):
    """g[L] . v is the directional derivative of the scored NLL when layer L's output moves by v
    (finite difference through the fp32 reference), and the loss never sees positions after P+D-1."""
    hf, act = fp32_activations
    tokens = torch.from_numpy(ev.reference.tokens.astype("int64"))
    targets = tokens[P + 1:P + D + 1]
    layer = 0
    v = torch.randn(P + D, ev.spec.hidden, generator=torch.Generator().manual_seed(1))

    def loss_with(eps: float) -> float:
        def shift(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            moved = out + eps * torch.cat([v, torch.zeros(out.shape[1] - P - D, v.shape[1])])[None]
            return (moved, *output[1:]) if isinstance(output, tuple) else moved
        handle = hf.model.layers[layer].register_forward_hook(shift)
        try:
            with torch.no_grad():
                logits = hf(input_ids=tokens[None, :P + D + 1], use_cache=False).logits[0, P:P + D]
        finally:
            handle.remove()
        return float(torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum"))

    eps = 1e-2
    slope = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert float((act.g[layer] * v).sum()) == pytest.approx(slope, rel=2e-2)
    assert torch.count_nonzero(act.g[layer][:P]) > 0  # prefill positions feed the decode ones


def test_fisher_score_is_the_sum_of_squared_dot_products():
    g = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    dy = torch.tensor([[3.0, -1.0], [5.0, 2.0]])
    assert fisher_score(g, dy) == (3 - 2) ** 2 + 2 ** 2


@pytest.fixture(scope="module")
def profile(ev):
    probes = [(1, DEFAULT), (1, BFP4), (1, BF16), (0, BFP4), (0, REFERENCE)]
    return probes, fisher_profile(ev, DEFAULT, probes)


def test_probe_equal_to_base_has_zero_delta(profile):
    probes, fp = profile
    assert len(fp.scores) == len(fp.deltas) == len(probes) and len(fp.base) == 2
    assert fp.base[1] > 0
    assert fp.scores[0] == fp.base[1] and fp.deltas[0] == 0.0


def test_bfp4_scores_above_bf16(profile):
    _, fp = profile
    assert fp.scores[1] > fp.scores[2]
    assert fp.deltas[1] > 0 > fp.deltas[2]  # the base's ff1_3 is bfp8: bfp4 is worse, bf16 better
    assert fp.deltas[3] == fp.scores[3] - fp.base[0] and fp.deltas[3] > 0


def test_reference_layer_scores_zero(ev, profile):
    _, fp = profile
    assert fp.scores[4] == 0.0 and fp.deltas[4] == -fp.base[0]
    ref = fisher_profile(ev, REFERENCE, [(0, REFERENCE), (1, REFERENCE)])
    assert ref.scores == [0.0, 0.0] and ref.base == [0.0, 0.0] and ref.deltas == [0.0, 0.0]
    assert ref.seconds_backward > 0 and ref.seconds_probes > 0


def test_windows_add_up(ttsweep_cache, ev, profile):
    probes, fp = profile
    two = fisher_profile(Evaluator("tiny-llama", prefill=P, decode=D, windows=2), DEFAULT, probes[:2])
    assert two.base[1] > fp.base[1] and two.scores[0] == two.base[1]


def test_bad_probes_are_refused(ev):
    with pytest.raises(ValueError, match="layer 2 is not a layer index 0..1"):
        fisher_profile(ev, DEFAULT, [(2, BFP4)])
    with pytest.raises(TypeError, match="must be an engine.vocab.config.Config"):
        fisher_profile(ev, DEFAULT, [(0, "ff1_3: bfp4")])
    with pytest.raises(ValueError, match="pair"):
        fisher_profile(ev, DEFAULT, [BFP4])
