"""Multi-chip performance: collectives (engine/perf/ccl.py), topologies, data parallel, prefill chunking,
the device table, prediction intervals and what the model refuses."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from engine.models.shapes import shape_for
from engine.perf import calibrate as cal
from engine.perf import ccl
from engine.perf.model import CCL_PREFIX, NotCovered, Params, device_distance, load_params, predict
from engine.vocab.devices import DEVICES, device_for, device_names

P = 262_144.0  # bytes: 32 rows x 4096 x bf16


# --- each collective against a hand count ------------------------------------------------------
@pytest.mark.parametrize("kind,n,ring,steps,wire", [
    ("all_gather", 2, False, 1, P / 2),  # N300: one hop, the other half crosses the link
    ("all_gather", 8, False, 7, 7 / 8 * P),  # a line of 8: the end chip receives 7 shards over one link
    ("all_gather", 8, True, 4, 4 / 8 * P),  # a bidirectional ring of 8: at most 4 hops, 4 shards per direction
    ("reduce_scatter", 8, True, 4, 4 / 8 * P),
    ("reduce_scatter", 4, False, 3, 3 / 4 * P),
    ("all_reduce", 4, False, 3, 3 * P),  # all-gather of whole partials, then a local reduce
    ("all_reduce", 8, True, 4, 4 * P),
    ("all_reduce_rs_ag", 8, False, 14, 2 * 7 / 8 * P),  # reduce-scatter + all-gather
    ("all_gather_matmul", 8, True, 4, 4 / 8 * P),
])
def test_collective_steps_and_wire_bytes_match_a_hand_count(kind, n, ring, steps, wire):
    assert ccl.steps(kind, n, ring) == steps
    assert ccl.wire_bytes(kind, n, ring, P) == pytest.approx(wire)
    c = ccl.Collective("x", kind, n, links=2, ring=ring, payload=P)
    data, lat, launch = ccl.cost(c, fixed_us=10.0, step_us=3.0, link_bytes_per_us=12_000.0)
    assert data == pytest.approx(wire / (2 * 12_000.0))
    assert lat == pytest.approx(steps * 3.0)
    assert launch == (20.0 if kind == "all_reduce_rs_ag" else 10.0)
    assert ccl.cost(dataclasses.replace(c, n=1), 10.0, 3.0, 12_000.0) == (0.0, 0.0, 0.0)


def _names(device: str, model: str, phase: str, dp: int = 1) -> list[str]:
    s, rep = shape_for(model), device_for(device).replica(dp)
    return [c.name for c in ccl.layer_plan(rep, hidden=s.hidden, attn_width=s.attn_width, qkv_out=s.qkv_out,
                                           intermediate=s.intermediate, rows=32, phase=phase)]


def test_layer_plans_are_the_collectives_tt_transformers_issues():
    one_d = ["attn_norm.all_gather", "wo.reduce_scatter", "ff_norm.all_gather", "w2.reduce_scatter"]
    assert _names("N150", "Llama3.1-8B", "decode") == []
    assert _names("N300", "Llama3.1-8B", "decode") == one_d
    # T3K ring: wo fused with its all-gather when (hidden/32/8) % 8 == 0 (4096: yes; 3072: no)
    assert _names("T3K", "Llama3.1-8B", "decode") == ["attn_norm.all_gather", "wo.all_gather_matmul",
                                                      "ff_norm.all_gather", "w2.reduce_scatter"]
    assert _names("T3K", "Llama3.2-3B", "decode") == one_d
    assert _names("T3K", "Llama3.1-8B", "prefill") == one_d  # the fused op is decode-only
    # 70B prefill on a 1-D mesh: distributed norms (a statistics gather before each output gather)
    assert _names("T3K", "Llama3.1-70B", "prefill") == [
        "attn_norm.stats_all_gather", "attn_norm.all_gather", "wo.reduce_scatter",
        "ff_norm.stats_all_gather", "ff_norm.all_gather", "w2.reduce_scatter"]
    # TG: rows (axis 0, 8 chips) and columns (axis 1, 4 chips)
    s, rep = shape_for("Llama3.1-70B"), device_for("TG").replica(1)
    plan = ccl.layer_plan(rep, hidden=s.hidden, attn_width=s.attn_width, qkv_out=s.qkv_out,
                          intermediate=s.intermediate, rows=32, phase="decode")
    got = {c.name: (c.kind, c.n, c.links, c.axis, c.count) for c in plan}
    assert got == {
        "attn_norm.stats_all_gather": ("all_gather", 4, 3, 1, 1.0), "qkv.all_reduce": ("all_reduce", 4, 3, 1, 1.0),
        "attn_out.all_gather": ("all_gather", 4, 2, 1, 1.0), "wo.all_reduce": ("all_reduce_rs_ag", 8, 4, 0, 1.0),
        "ff_norm.stats_all_gather": ("all_gather", 4, 3, 1, 1.0),
        "w1_w3.reduce_scatter": ("reduce_scatter", 4, 3, 1, 2.0), "w2_in.all_gather": ("all_gather", 4, 2, 1, 1.0),
        "w2.all_reduce": ("all_reduce_rs_ag", 8, 4, 0, 1.0)}
    # hidden < 8192 in decode: all-gather + local reduce instead of reduce-scatter + all-gather
    assert "w1_w3.all_reduce" in _names("TG", "Llama3.1-8B", "decode")
    assert dict((c.name, c.kind) for c in ccl.layer_plan(
        device_for("TG").replica(1), hidden=4096, attn_width=4096, qkv_out=6144, intermediate=14336, rows=32,
        phase="decode"))["wo.all_reduce"] == "all_reduce"
    # a data-parallel sub-mesh runs as the system of its size: 8 TG chips are a T3K ring, 2 an N300
    assert _names("TG", "Llama3.1-8B", "decode", dp=4) == _names("T3K", "Llama3.1-8B", "decode")
    assert device_for("TG").replica(16).links == device_for("N300").replica(1).links


def test_breakdown_prices_each_collective_by_hand():
    prm = load_params()
    res = predict("Llama3.1-8B", "T3K", "performance", params=prm)
    layers, chip = shape_for("Llama3.1-8B").n_layers, device_for("T3K").chip
    bw = chip.eth_payload_gbs * 1e3 * prm.eth_eff
    payload = 32 * 4096 * 2.0
    hand = prm.ccl_us + 4 * (chip.hop_us + prm.ccl_step_us) + (4 / 8 * payload) / (1 * bw)
    assert res.breakdown[CCL_PREFIX + "w2.reduce_scatter"]["decode_us"] == pytest.approx(layers * hand)
    assert res.breakdown[CCL_PREFIX + "norm.all_gather"]["decode_us"] == pytest.approx(hand)  # once per step
    # prefill: the launch is dispatched to every chip from the host; 128 rows
    p_hand = prm.ccl_prefill_us * 8 + 4 * (chip.hop_us + prm.ccl_step_us) + (4 / 8 * 128 * 4096 * 2.0) / bw
    assert res.breakdown[CCL_PREFIX + "w2.reduce_scatter"]["prefill_us"] == pytest.approx(layers * p_hand)
    info = {c["name"]: c for c in res.collectives}
    assert info["w2.reduce_scatter"]["decode_us_each"] == pytest.approx(hand)
    assert info["w2.reduce_scatter"]["decode_us"] == pytest.approx(layers * hand)
    assert sum(e["decode_us"] for e in res.breakdown.values()) == pytest.approx(res.decode_step_ms * 1e3)
    assert not [k for k in predict("Llama3.1-8B", "N150").breakdown if k.startswith(CCL_PREFIX)]


# --- per-system differences come from the table, never from a constant per system ---------------
def test_no_parameter_is_per_system_and_a_renamed_system_predicts_the_same():
    names = {f.name.lower() for f in dataclasses.fields(Params)}
    assert not [n for n in names for d in DEVICES if d.lower() in n]
    t3k = device_for("T3K")
    twin = dataclasses.replace(t3k, name="MyRing8", aliases=())
    # (prompts up to 4K: tt_transformers' chunk table is keyed by system name, 4K for names it lacks)
    for kw in ({}, {"batch": 32}, {"prefill": 4096}, {"dp": 4}):
        a, b = predict("Llama3.1-8B", t3k, **kw), predict("Llama3.1-8B", twin, **kw)
        assert (a.speed_tsu, a.ttft_ms) == pytest.approx((b.speed_tsu, b.ttft_ms))
    # the same chips as a line instead of a ring: only the collectives change, and they get slower
    line = dataclasses.replace(t3k, name="Line8", topology="line", aliases=())
    a, b = predict("Llama3.2-3B", t3k), predict("Llama3.2-3B", line)
    for op, e in a.breakdown.items():
        if not op.startswith(CCL_PREFIX):
            assert b.breakdown[op]["decode_us"] == pytest.approx(e["decode_us"]), op
    assert b.speed_tsu < a.speed_tsu
    # more links per neighbour: cheaper data movement, nothing else
    wide = dataclasses.replace(t3k, name="Wide8", ccl_links=(4, 4), aliases=())
    assert predict("Llama3.1-8B", wide, prefill=32768).ttft_ms < predict("Llama3.1-8B", t3k, prefill=32768).ttft_ms


# --- data parallel -------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["Llama3.2-1B", "Llama3.1-8B", "Qwen2.5-7B", "Phi3.5-mini"])
@pytest.mark.parametrize("device", ["N300", "T3K", "TG"])
@pytest.mark.parametrize("batch", [1, 32])
def test_dp_per_user_speed_never_above_a_lone_replica(model, device, batch):
    dev = device_for(device)
    for dp in dev.legal_dp():
        rep = dev.replica(dp)
        lone = device_for(rep.system) if rep.system != dev.name else dataclasses.replace(
            dev, name=rep.system, chips=rep.tp, mesh=rep.mesh, topology=rep.layout, ccl_links=rep.links)
        many = predict(model, device, dp=dp, batch=batch)
        alone = predict(model, lone, batch=batch)  # the replica on its own, with a host of its own
        assert many.speed_tsu <= alone.speed_tsu * (1 + 1e-12)
        assert many.throughput_tps == pytest.approx(dp * batch * many.speed_tsu)
        assert many.ttft_ms <= alone.ttft_ms * (1 + 1e-12)  # replicas prefill concurrently
        prm = load_params()  # one host drives them all: the step grows by the extra replicas' host work
        extra = (dp - 1) * (prm.replica_us + batch * prm.user_step_us)
        assert many.decode_step_ms * 1e3 == pytest.approx(alone.decode_step_ms * 1e3 + extra)


# --- long context ----------------------------------------------------------------------------------
def test_long_prompts_are_prefilled_in_tt_transformers_chunks():
    s = shape_for("Llama3.1-8B")
    assert (s.prefill_chunk("N150"), s.prefill_chunk("N300"), s.prefill_chunk("T3K")) == (4096, 65536, 131072)
    assert shape_for("Llama3.1-70B").prefill_chunk("N150") is None  # does not fit
    assert shape_for("smollm2-135m").prefill_chunk("N150") == 4096  # tt_transformers' fallback
    n150 = predict("Llama3.1-8B", "N150", prefill=65536)
    n300 = predict("Llama3.1-8B", "N300", prefill=65536)
    assert (n150.prefill_chunks, n300.prefill_chunks) == (16, 1)
    prm = load_params()
    # every chunk dispatches every op again: qkv's host overhead is layers x chunks x one dispatch
    assert n150.breakdown["qkv"]["prefill_overhead_us"] == pytest.approx(32 * 16 * prm.prefill_op_us)
    # chunking costs dispatch and prefix reads, never saves work
    one = predict(dataclasses.replace(s, prefill_chunk_k=(("N150", 64),)), "N150", prefill=65536)
    assert one.prefill_chunks == 1 and n150.ttft_ms > one.ttft_ms


def test_long_context_decode_is_bounded_by_the_sdpa_chunk_chain():
    # the chain does not shrink with chips: 4 kv heads per chip (N300) or 1 (T3K) walk their
    # caches in parallel, so SDPA decode at 64K costs each chip the same
    n300, t3k = (predict("Llama3.2-1B", d, prefill=65536).breakdown["sdpa"] for d in ("N300", "T3K"))
    assert t3k["decode_compute_us"] == pytest.approx(n300["decode_compute_us"])
    assert t3k["kv_bytes"] == pytest.approx(n300["kv_bytes"] / 4)
    prm = load_params()
    res = predict("Llama3.2-1B", "T3K", prefill=65536)
    chain = 16 * (65536 + 100) * prm.sdpa_pos_ns / 1e3
    assert res.breakdown["sdpa"]["decode_compute_us"] >= chain * (1 - 1e-9)


# --- the device table drives every consumer -------------------------------------------------------
def test_device_table_drives_the_study_files(monkeypatch):
    from engine.vocab import devices
    from sweep.space.parse import legal_devices

    assert legal_devices() == device_names() == tuple(DEVICES)
    assert {"N150", "N300", "T3K", "TG", "P150", "P100"} <= set(device_names())
    monkeypatch.setitem(devices.DEVICES, "X1", dataclasses.replace(DEVICES["N150"], name="X1"))
    assert "X1" in legal_devices()
    assert device_for("T3K").tp == 8 and device_for("TG").tp == 32 and device_for("N300").replica(2).tp == 1
    assert device_for("TG").replica(1).k_split("wo") == 8 and device_for("TG").replica(1).k_split("qkv") == 4
    assert device_for("T3K").replica(1).k_split("ff2") == 8 and device_for("T3K").replica(1).k_split("ff1_3") == 1


def test_blackhole_is_marked_uncalibrated_and_never_fitted():
    for name in ("P150", "P100", "P150x4"):
        dev = device_for(name)
        assert dev.arch == "blackhole" and not dev.calibrated and name in cal.HELD_BACK
        res = predict("Llama3.1-8B", name)
        assert not res.calibrated_device and any("no published measurements" in w for w in res.warnings)
    assert device_for("p150a").name == "P150"
    # 130 Tensix cores at 1.35 GHz against 64 at 1 GHz: prefill (compute-bound) is faster
    assert predict("Llama3.1-8B", "P150", prefill=4096).ttft_ms < predict("Llama3.1-8B", "N150", prefill=4096).ttft_ms
    with pytest.raises(ValueError, match="P150"):
        cal.fit([cal.Row(model="Llama3.1-8B", device="P150", config="performance", speed=30.0)])
    assert predict("Llama3.1-8B", "T3K").warnings == []


# --- prediction intervals ---------------------------------------------------------------------------
def test_intervals_widen_with_distance_from_the_calibration_data():
    cal_devs = ["N150", "N300", "T3K"]
    assert [device_distance(d, cal_devs) for d in ("N150", "N300", "T3K")] == [0, 0, 0]
    tg = device_distance("TG", cal_devs)
    assert tg == pytest.approx(2 + 1)  # two chip-count doublings from T3K, and a 2-D mesh
    big = dataclasses.replace(DEVICES["TG"], name="TG64", chips=64, mesh=(16, 4))
    assert device_distance(big, cal_devs) > tg
    assert device_distance("P150", cal_devs) > device_distance("N150", cal_devs)

    def width(model, device, **kw):
        r = predict(model, device, **kw)
        lo, hi = r.speed_interval
        assert lo < r.speed_tsu < hi
        assert r.ttft_interval[0] < r.ttft_ms < r.ttft_interval[1]
        return math.log(hi / lo)

    assert width("Llama3.1-8B", "N300") == pytest.approx(width("Llama3.1-8B", "T3K"))  # both calibrated
    assert width("Llama3.1-8B", "TG") > width("Llama3.1-8B", "T3K")
    assert width("Llama3.1-70B", "TG") > width("Llama3.1-70B", "T3K")
    assert width("smollm2-135m", "N150") >= width("Llama3.1-8B", "N150")  # an unseen model
    assert width("Llama3.1-8B", "P150") > width("Llama3.1-8B", "N150")


def test_conformal_quantile_is_the_split_conformal_order_statistic():
    vals = [0.1, -0.3, 0.2, 0.05]  # |.| sorted: 0.05 0.1 0.2 0.3
    assert cal.conformal_quantile(vals, level=0.5) == 0.2  # the ceil(5 x 0.5) = 3rd smallest
    assert cal.conformal_quantile(vals, level=0.9) == 0.3  # ceil(4.5) = 5 > n: the largest
    iv = cal.intervals_from([(None, 0.01, 0.02)] * 9, {"m": {"residuals": [[0.05, 0.1]] * 9}},
                            {"N150": {"residuals": [[0.2, 0.3]] * 9}, "T3K": {"residuals": [[0.2, 0.3]] * 9}})
    assert iv["speed"] == {"in_sample": 0.01, "lomo": 0.05, "lodo": 0.2}
    assert iv["ttft"] == {"in_sample": 0.02, "lomo": 0.1, "lodo": 0.3}
    # N150 with T3K alone: log2(8) = 3 doublings + a layout it lacks; T3K with N150 alone: the same
    assert iv["lodo_distance"] == pytest.approx(4.0)


def test_calibration_recovers_known_parameters_and_cross_validates():
    """Synthetic published figures made by the model itself: the fit finds errors near zero and the
    leave-one-out refits predict the held-out rows."""
    truth = Params().replace(ccl_us=25.0, replica_us=450.0, token_us=5000.0)
    rows = []
    for model in ("Llama3.2-1B", "Llama3.1-8B"):
        for dev, dp in (("N150", 1), ("N300", 1), ("T3K", 1), ("T3K", 4)):
            r = predict(model, dev, "performance", dp=dp, params=truth)
            rows.append(cal.Row(model=model, device=dev, config="performance", dp=dp,
                                speed=r.speed_tsu, ttft=r.ttft_ms))
    names = ("ccl_us", "replica_us", "token_us")
    got = cal.fit(rows, names=names, starts=1)
    for n in names:
        assert getattr(got, n) == pytest.approx(getattr(truth, n), rel=0.02), n
    assert cal.errors(rows, got)["mape"]["speed"] < 0.5


def test_vision_pipeline_model_is_refused_with_the_reason():
    with pytest.raises(NotCovered, match="vision pipeline"):
        predict("Llama3.2-90B", "T3K")
    row = cal.Row(model="Llama3.2-90B", device="T3K", config="performance", speed=6.0, ttft=5535.0)
    assert not cal.covered(row)
    sections = cal.prediction_table([row], extras=False)
    assert sections[0].rows[0].kind == "refused" and sections[0].rows[0].speed_pred is None
    text = cal.format_prediction_table(sections)
    assert "not covered" in text and "Not covered: Llama3.2-90B" in text
    # the 11B's text path is covered (its cross-attention layers count toward memory only)
    assert predict("Llama3.2-11B", "T3K").speed_tsu == pytest.approx(predict("Llama3.1-8B", "T3K").speed_tsu)


def test_sweep_perf_json_carries_intervals_and_collectives(capsys):
    from sweep.cli import main

    assert main(["perf", "--model", "Llama3.1-70B", "--device", "TG", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lo, hi = out["speed_interval"]
    assert lo < out["speed_tsu"] < hi and out["interval_level"] == pytest.approx(0.9)
    assert out["distance"] > 0 and out["calibrated_device"] is False and out["warnings"]
    assert {c["name"] for c in out["collectives"]} >= {"wo.all_reduce", "w2.all_reduce", "qkv.all_reduce"}
    assert main(["perf", "--model", "Llama3.2-90B", "--device", "T3K"]) == 2
    assert "vision pipeline" in capsys.readouterr().err
    assert main(["perf", "devices"]) == 0
    assert "UNCALIBRATED" in capsys.readouterr().out


def test_plots_and_report_notes_carry_the_speed_interval():
    from types import SimpleNamespace

    from sweep import plots, report

    res = predict("Llama3.1-8B", "TG")
    rec = SimpleNamespace(model="Llama3.1-8B", speed={"TG": res.speed_tsu, "N300": 40.0},
                          ttft={"TG": res.ttft_ms, "N300": 70.0})
    point = SimpleNamespace(number=0, record=rec,
                            value=lambda obj: getattr(rec, obj.partition(":")[0])[obj.partition(":")[2]])
    # the absolute interval, stated once per plot, is the prediction interval
    assert plots.absolute_interval("speed:TG", point) == pytest.approx(res.speed_interval)
    assert plots.absolute_interval("ttft:TG", point) == pytest.approx(res.ttft_interval)
    # the bars: between configs (relative to a reference), narrower, and wider on TG than on N300
    other = SimpleNamespace(number=1, record=rec, value=lambda obj: 0.95 * point.value(obj))
    lo, hi = plots._ci(other, "speed:TG", point)
    assert lo < other.value("speed:TG") < hi and (hi / lo) < (res.speed_interval[1] / res.speed_interval[0])
    lo3, hi3 = plots._ci(other, "speed:N300", point)
    assert lo3 < 0.95 * 40.0 < hi3 and (hi3 / lo3) < (hi / lo)  # TG is farther out
    assert plots._ci(point, "speed:TG", point) == (point.value("speed:TG"),) * 2  # the reference: no bar
    assert plots._err_label("top1", "speed:TG", [[1], [1]], [[1], [1]], point) == (
        "Top-1: 95% Wilson / speed: 90% between configs, vs trial 0")
    text = report.interval_text(point, ["N300", "TG"])
    assert text.startswith("90% prediction intervals") and f"TG {res.speed_interval[0]:.1f}-" in text
