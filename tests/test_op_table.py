"""engine.vocab.ops, THE op table: consistent with itself, and the model, the equivalence rules
and the performance model agree with it (issue 20: one table of op numerics)."""
from __future__ import annotations

import pytest
import torch

import engine.models.model as em
from engine.models import loaders
from engine.numerics import formats
from engine.perf import model as perf
from engine.vocab import ops
from engine.vocab.config import DEFAULT, OpGroup, Precision
from sweep import equivalence

ACTIVATIONS = (None, "bf16", "bfp8")
#: a distinct fidelity per op group of one mode, so each recorded matmul names its op (the LM head's
#: hifi2fp16 is left out: its matmul is not a layer op)
PREFILL = {"li_qkv_prefill": "hifi4", "sdpa_prefill": "hifi3", "li_o_prefill": "hifi2", "li_ff1_3": "lofi",
           "li_ff2": "hifi2na"}
DECODE = {"li_qkv_decode": "hifi4", "sdpa_decode": "hifi3", "li_o_decode": "hifi2", "li_ff1_3": "lofi",
          "li_ff2": "hifi2na"}


def _representable(x: torch.Tensor, fmt: str) -> bool:
    return fmt == ops.FULL or torch.equal(formats.quantize(x, fmt, rounding="device"), x)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_matmul_reads_what_its_producer_writes(act):
    for o in ops.OPS.values():
        if o.fidelity:
            assert o.producer in ops.OPS, o.name
            assert ops.src_b_dtype(o.name, act) == ops.out_dtype(o.producer, act), o.name


def test_full_precision_mode_rounds_nothing_and_the_weight_readers_cover_the_groups():
    assert {ops.out_dtype(n, "fp32") for n in ops.OPS} == {"fp32"}
    assert set(ops.WEIGHT_OPS) == {"wqkv", "wo", "ff1_3", "ff2", "kv_cache"}
    assert {o.fidelity for o in ops.OPS.values() if o.fidelity} == {g.value for g in OpGroup}


@pytest.fixture(scope="module")
def tiny():
    ld = loaders.load("tiny-llama")
    return em.Model(ld.spec, ld.weights)


def _recorded(model, cfg, prefill: bool, monkeypatch) -> dict[str, list]:
    """op -> [(SrcB, out_fmt, interm)] of every matmul one prefill (or one decode step) runs."""
    names = {v: k for k, v in (PREFILL if prefill else DECODE).items()}
    calls: dict[str, list] = {}
    real = em.mm

    def spy(setting, x, w, k_block=None, out_fmt="bf16", interm=None):
        if setting.value in names:
            calls.setdefault(names[setting.value], []).append((x.detach().clone(), out_fmt, interm))
        return real(setting, x, w, k_block, out_fmt, interm)

    toks = torch.arange(3, 40)
    if prefill:
        monkeypatch.setattr(em, "mm", spy)
        model.prefill(toks, cfg)
    else:
        _, cache = model.prefill(toks, cfg)
        monkeypatch.setattr(em, "mm", spy)
        model.decode_batched(torch.tensor([5, 6]), cache, cfg)
    monkeypatch.setattr(em, "mm", real)
    return calls


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_the_model_runs_every_op_as_the_table_says(tiny, prefill, act, monkeypatch):
    cfg = DEFAULT.replace(activation=act or "mixed", **(PREFILL if prefill else DECODE))
    calls = _recorded(tiny, cfg, prefill, monkeypatch)
    assert set(calls) == set(PREFILL if prefill else DECODE)
    for op, recs in calls.items():
        src_b, out = ops.src_b_dtype(op, act), ops.out_dtype(op, act)
        if op.startswith("sdpa"):  # Q @ K^T reads Q, P @ V the bf16 softmax P; scores held in bf16
            assert all(_representable(x, src_b) for x, _, _ in recs[0::2]), op
            assert all(_representable(x, ops.OPS[op].second_src_b) for x, _, _ in recs[1::2]), op
            continue
        for x, out_fmt, interm in recs:
            assert _representable(x, src_b), (op, src_b)
            assert out_fmt == out, (op, out_fmt, out)
            assert interm == ops.partials(op, prefill, act), op
    # the check can fail: a bfp8 table entry is not met by the bf16 operands of a mixed qkv
    if act is None and prefill:
        assert not _representable(calls["li_qkv_prefill"][0][0], "bfp8")


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_the_equivalence_rules_read_the_table(act):
    cfg = DEFAULT.replace(activation=act or "mixed")
    for g in OpGroup:
        row = ops.OPS[g.value]
        assert equivalence.SRC_A[g].value == row.weight
        want = row.second_src_b or ops.src_b_dtype(g.value, act)
        assert equivalence._src_b_precision(cfg, g) is Precision(want)


def _perf_agrees(act) -> list[str]:
    cfg = DEFAULT.replace(activation=act or "mixed")
    bad = []
    for name, pair in perf.LINEAR_OPS.items():
        for prefill, op in ((False, pair[0]), (True, pair[1])):
            want = tuple(perf.bytes_per_element(d) for d in (ops.src_b_dtype(op, act), ops.out_dtype(op, act)))
            if perf.linear_io(cfg, name, prefill) != want:
                bad.append(f"{op}: perf {perf.linear_io(cfg, name, prefill)} vs table {want}")
    return bad


def test_the_performance_model_prices_the_tables_dtypes_for_mixed_layers():
    assert _perf_agrees(None) == []


@pytest.mark.xfail(strict=True, reason="known: under a forced activation the perf model prices the qkv and w1/w3 "
                   "inputs as bf16 and the decode wo output in the activation (the table: the activation, and bf16); "
                   "fixing it moves committed speed figures of bfp8-activation configs (reports/allocate)")
def test_the_performance_model_prices_the_tables_dtypes_under_a_forced_activation():
    assert _perf_agrees("bfp8") == []
