"""The assumption band (engine.vocab.assumptions): each switch is wired to the rule it names (the
output moves), the defaults are today's numerics bit for bit, and `sweep eval --assumptions`."""
from __future__ import annotations

import json

import pytest
import torch

import engine.models.model as em
from engine.accuracy.evaluator import score_tokens
from engine.models import loaders
from engine.vocab import assumptions as A
from engine.vocab.config import DEFAULT
from sweep.cli import main

CFG = DEFAULT.replace(activation="bfp8")  # bfp8 outputs everywhere: the packer switch has work to do


@pytest.fixture(scope="module")
def tiny():
    return loaders.load("tiny-llama")


def _logits(ld, assumptions=None):
    m = em.Model(ld.spec, ld.weights, assumptions=assumptions)
    return m.prefill(torch.arange(3, 40), CFG, logits_for="all")[0]


def test_the_table_validates_and_keys_only_what_changed():
    assert A.key({}) == "" and A.key({"bfp_pack": "precise"}) == ""
    assert A.key({"bfp_pack": "double"}) == "+assume:bfp_pack=double"
    with pytest.raises(ValueError, match="unknown assumption 'bfp'"):
        A.resolve({"bfp": "double"})
    with pytest.raises(ValueError, match="legal values: precise, double"):
        A.resolve({"bfp_pack": "triple"})
    labels = [label for label, _ in A.band()]
    assert labels[0] == "defaults" and labels[-1] == "all alternatives"
    assert len(labels) == 2 + sum(len(a.alternatives) for a in A.ASSUMPTIONS.values())


def test_defaults_are_todays_numerics_bit_for_bit(tiny):
    explicit = {name: a.default for name, a in A.ASSUMPTIONS.items()}
    assert torch.equal(_logits(tiny), _logits(tiny, explicit))


@pytest.mark.parametrize("switches", [{"bfp_pack": "double"}, {"bfp_pack": "double", "gasket_ties": "even"},
                                      {"dest16_round": "away"}], ids=["bfp_pack", "gasket_ties", "dest16_round"])
def test_each_model_switch_moves_the_output(tiny, switches):
    base = _logits(tiny, {k: v for k, v in switches.items() if k == "bfp_pack" and len(switches) > 1})
    assert not torch.equal(_logits(tiny, switches), base)


def test_the_dest16_switch_is_restored_after_a_run(tiny):
    from engine.numerics import fidelity

    _logits(tiny, {"dest16_round": "away"})
    assert fidelity._DEST16["ties"] == "even"
    x, w = torch.randn(8, 64), torch.randn(64, 32)
    assert torch.equal(fidelity.matmul(x, w, "lofi"), fidelity.matmul(x, w, "lofi"))


def test_argmax_ties_pick_the_first_or_the_last_equal_logit():
    class Ref:  # the few prepared fields score_tokens reads: reference argmax 2, top-5 2, 5, 0, 1, 3
        decode, prefill = 1, 1
        logp = torch.zeros(1, 6)

        @staticmethod
        def prepared():
            return {"p": torch.full((1, 6), 1 / 6), "top5": torch.tensor([[2, 5, 0, 1, 3]]),
                    "targets": torch.tensor([2]), "neg_entropy": torch.tensor([0.0]).double(),
                    "ref_nll": torch.tensor([1.0]).double()}

    logits = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]])  # indices 2 and 5 tie
    assert bool(score_tokens(logits, Ref(), "first")["top1"][0])
    assert not bool(score_tokens(logits, Ref(), "last")["top1"][0])
    assert bool(score_tokens(logits, Ref(), "last")["top5"][0])


def test_sweep_eval_assumptions_band(capsys, tmp_path):
    args = ["eval", "--model", "tiny-llama", "--config", "precision_cfg = {activation: bfp8}", "--prefill", "32",
            "--decode", "31", "--cache-dir", str(tmp_path), "--assumptions", "--json"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    band = d["assumptions"]
    assert [r["label"] for r in band["runs"]] == [label for label, _ in A.band()]
    assert band["runs"][0]["top1"] == d["top1"] and band["runs"][0]["kld"] == d["kld"]
    lo, hi = band["range"]["kld"]
    assert lo <= d["kld"] <= hi and lo < hi  # the switches move KLD
    assert set(band["switches"]) == set(A.ASSUMPTIONS)


def test_a_bad_assume_is_one_line(capsys, tmp_path):
    rc = main(["eval", "--model", "tiny-llama", "--assume", "bfp_pack=triple", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "legal values: precise, double" in err[0]
