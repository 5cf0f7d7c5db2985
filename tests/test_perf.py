"""The analytic performance model (engine/perf/model.py), its calibration and the `sweep perf` command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine.models.shapes import shape_for
from engine.models.spec import ModelSpec
from engine.perf import calibrate as cal
from engine.perf.model import (
    CCL_PREFIX,
    PARAMS_FILE,
    NotCovered,
    calibration_note,
    load_params,
    params_metadata,
    predict,
)
from engine.vocab.config import Config, ModelConfig
from engine.vocab.devices import device_for, normalise_device

SEED = cal.SEED_FILE
LOFI_ALL = dict(li_ff1_3="lofi", li_ff2="lofi", li_qkv_decode="lofi", li_o_decode="lofi")


def _uniform(fmt: str, **fid) -> Config:
    return Config(ff1_3=fmt, ff2=fmt, wqkv=fmt, wo=fmt, kv_cache=fmt, **fid)


# --- bytes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,bpe", [("bfp8", 1.0625), ("bfp4", 0.5625)])
def test_weight_and_kv_bytes_match_a_hand_count_for_one_llama_1b_layer(fmt, bpe):
    # Llama3.2-1B: hidden 2048, 32 q heads and 8 kv heads of 64, MLP 8192
    qkv = 2048 * (32 + 2 * 8) * 64
    wo = 32 * 64 * 2048
    ff1_3 = 2 * 2048 * 8192
    ff2 = 8192 * 2048
    res = predict("Llama3.2-1B", "N150", _uniform(fmt), prefill=128, decode=200)
    per_layer = {op: res.breakdown[op]["weight_bytes"] / 16 for op in ("qkv", "wo", "ff1_3", "ff2")}
    assert per_layer == {"qkv": qkv * bpe, "wo": wo * bpe, "ff1_3": ff1_3 * bpe, "ff2": ff2 * bpe}
    assert sum(per_layer.values()) == (64_618_496 if fmt == "bfp8" else 34_209_792)
    # K and V of 8 kv heads x 64 over the mean attended context (128 prompt + 200/2 generated)
    assert res.breakdown["sdpa"]["kv_bytes"] / 16 == 2 * 8 * 64 * 228 * bpe
    # the LM head is bfp8 whatever the config says (2048 x 128256)
    assert res.breakdown["lm_head"]["weight_bytes"] == 2048 * 128256 * 1.0625


def test_tensor_parallel_splits_weights_across_chips():
    one = predict("Llama3.1-8B", "N150")
    two = predict("Llama3.1-8B", "N300")
    eight = predict("Llama3.1-8B", "T3K")
    w = lambda r: sum(r.breakdown[op]["weight_bytes"] for op in ("qkv", "wo", "ff1_3", "ff2"))
    assert w(two) == pytest.approx(w(one) / 2)
    assert w(eight) == pytest.approx(w(one) / 8)


# --- monotonic in formats and fidelity -------------------------------------------------------
@pytest.mark.parametrize("model,device", [("Llama3.1-8B", "N150"), ("Llama3.2-1B", "N300"), ("Llama3.1-70B", "T3K")])
def test_speed_rises_monotonically_as_formats_shrink(model, device):
    speeds = [predict(model, device, _uniform(f, **LOFI_ALL)).speed_tsu for f in ("bf16", "bfp8", "bfp4")]
    assert speeds[0] < speeds[1] < speeds[2]
    # one group at a time, default fidelities: never slower with a smaller format
    for group in ("ff1_3", "ff2", "wqkv", "wo", "kv_cache"):
        s = [predict(model, device, Config(**{group: f})).speed_tsu for f in ("bf16", "bfp8", "bfp4")]
        assert s[0] <= s[1] <= s[2], group
        assert s[0] < s[2], group


def test_speed_falls_as_fidelity_phases_grow():
    # bfp4 MLP weights are cheap to read: the matmul becomes compute-bound as phases grow
    speeds = [predict("Llama3.1-8B", "N150", Config(ff1_3="bfp4", li_ff1_3=f)).speed_tsu
              for f in ("lofi", "hifi2", "hifi3", "hifi4")]
    assert speeds[0] > speeds[1] > speeds[2] > speeds[3]
    for op in ("li_ff2", "li_qkv_decode", "li_o_decode", "sdpa_decode"):
        s = [predict("Llama3.1-8B", "N300", Config(**{op: f}), prefill=8192).speed_tsu for f in ("lofi", "hifi2", "hifi4")]
        assert s[0] >= s[1] >= s[2], op
    # prefill is compute-bound at long prompts: TTFT grows with the phases of every prefill op
    for op in ("li_ff1_3", "li_ff2", "li_qkv_prefill", "li_o_prefill", "sdpa_prefill"):
        t = [predict("Llama3.1-8B", "N150", Config(**{op: f}), prefill=65536).ttft_ms for f in ("lofi", "hifi2", "hifi4")]
        assert t[0] < t[1] < t[2], op


# --- context, data parallel, more chips ------------------------------------------------------
@pytest.mark.parametrize("model,device", [("Llama3.1-8B", "N150"), ("Llama3.2-1B", "N300"), ("Llama3.1-70B", "TG")])
def test_ttft_grows_faster_than_linearly_at_64k(model, device):
    t32 = predict(model, device, prefill=32768).ttft_ms
    t64 = predict(model, device, prefill=65536).ttft_ms
    assert t64 > 2.1 * t32
    # and decode slows with context: the KV cache is read every step
    assert predict(model, device, prefill=65536).speed_tsu < predict(model, device, prefill=128).speed_tsu


@pytest.mark.parametrize("model,device,dp,single", [
    ("Llama3.1-8B", "T3K", 8, "N150"), ("Llama3.1-8B", "T3K", 4, "N300"),
    ("Llama3.2-1B", "TG", 32, "N150"), ("Llama3.2-11B", "TG", 16, "N300"),
])
@pytest.mark.parametrize("batch", [1, 32])
def test_dp_replicas_run_as_the_single_system_and_share_one_host(model, device, dp, single, batch):
    many = predict(model, device, dp=dp, batch=batch)
    rep = predict(model, single, batch=batch)
    assert many.tp == device_for(device).chips // dp == device_for(single).chips and many.system == single
    assert many.throughput_tps == pytest.approx(dp * batch * many.speed_tsu)
    host = lambda r: r.breakdown["host"]["decode_us"]
    # everything but the host's loop is the lone replica's; the host adds each extra replica's work
    assert many.decode_step_ms * 1e3 - host(many) == pytest.approx(rep.decode_step_ms * 1e3 - host(rep))
    assert host(many) > host(rep) and many.speed_tsu < rep.speed_tsu
    assert many.ttft_ms <= rep.ttft_ms


@pytest.mark.parametrize("model", ["Llama3.2-1B", "Llama3.1-8B", "Qwen2.5-7B", "Phi-3-mini-128k-instruct", "Llama3.1-70B"])
@pytest.mark.parametrize("kw", [{}, {"batch": 32}, {"prefill": 32768}])
def test_more_chips_never_slower_by_more_than_the_collective_cost(model, kw):
    chain = [predict(model, d, **kw) for d in ("N150", "N300", "T3K", "TG")]
    ccl = lambda r, k: sum(e[k] for op, e in r.breakdown.items() if op.startswith(CCL_PREFIX))
    for fewer, more in zip(chain, chain[1:]):
        # chunks per prompt may differ by system (tt_transformers' chunk table): compare per chunk
        per = fewer.prefill_chunks / more.prefill_chunks if kw.get("prefill") else 1.0
        assert more.decode_step_ms * 1e3 <= fewer.decode_step_ms * 1e3 + ccl(more, "decode_us") + 1e-6
        assert more.prefill_ms * 1e3 <= max(1.0, 1 / per) * fewer.prefill_ms * 1e3 + ccl(more, "prefill_us") + 1e-6
    assert ccl(chain[0], "decode_us") == 0.0


def test_batch_costs_per_user_work_but_not_padded_compute():
    one, full = predict("Llama3.1-8B", "N150", batch=1), predict("Llama3.1-8B", "N150", batch=32)
    assert full.speed_tsu < one.speed_tsu  # per-user attention and host work
    assert full.throughput_tps > 10 * one.throughput_tps
    # the matmuls pad decode rows to 32: batch 1 and 32 cost the same
    assert full.breakdown["ff1_3"]["decode_us"] == pytest.approx(one.breakdown["ff1_3"]["decode_us"])


# --- API -------------------------------------------------------------------------------------
def test_breakdown_adds_up_and_is_inspectable():
    res = predict("Llama3.1-70B", "TG", "accuracy")
    assert sum(e["decode_us"] for e in res.breakdown.values()) == pytest.approx(res.decode_step_ms * 1e3)
    assert sum(e["prefill_us"] for e in res.breakdown.values()) == pytest.approx(res.prefill_ms * 1e3)
    assert res.speed_tsu == pytest.approx(1e3 / res.decode_step_ms)
    for op in ("qkv", "wo", "ff1_3", "ff2", "sdpa", "ccl:wo.all_reduce", "ccl:qkv.all_reduce", "lm_head", "host"):
        assert {"decode_us", "prefill_us", "bytes", "flops"} <= set(res.breakdown[op]), op
    d = res.to_dict()
    assert json.loads(json.dumps(d))["speed_tsu"] == pytest.approx(res.speed_tsu)


def test_per_layer_config_costs_each_layer_with_its_own_config():
    n = shape_for("Llama3.2-1B").n_layers
    fast, slow = Config(ff1_3="bfp4", ff2="bfp4"), Config(ff1_3="bf16", ff2="bf16")
    mixed = ModelConfig(tuple([slow] * 4 + [fast] * (n - 4)))
    s_fast = predict("Llama3.2-1B", "N150", ModelConfig.uniform(fast, n)).speed_tsu
    s_slow = predict("Llama3.2-1B", "N150", slow).speed_tsu
    s_mixed = predict("Llama3.2-1B", "N150", mixed).speed_tsu
    assert s_slow < s_mixed < s_fast
    assert predict("Llama3.2-1B", "N150", str(mixed)).speed_tsu == pytest.approx(s_mixed)
    with pytest.raises(ValueError, match="decoder layers"):
        predict("Llama3.1-8B", "N150", mixed)


def test_config_strings_and_presets_resolve_like_engine_config():
    header = ("precision_cfg = {ff1_3: bfp4, ff2: bfp8, wqkv: bfp8, wo: bfp8, kv_cache: bfp8, activation: mixed}, "
              "fidelity_cfg = {li_ff1_3: lofi, li_ff2: hifi2, li_qkv_decode: hifi2, li_o_decode: hifi2, "
              "sdpa_decode: hifi2na, li_qkv_prefill: hifi2, li_o_prefill: hifi2fp16, sdpa_prefill: hifi4}")
    a = predict("Llama3.2-1B", "N300", "performance")
    b = predict("Llama3.2-1B", "N300", header)
    assert a.speed_tsu == pytest.approx(b.speed_tsu) and a.ttft_ms == pytest.approx(b.ttft_ms)
    # Qwen2.5-7B's performance preset keeps bf16 attention: slower than bfp8 attention would be
    q = predict("Qwen2.5-7B", "N300", "performance").speed_tsu
    assert q < predict("Qwen2.5-7B", "N300", Config(ff1_3="bfp4", li_ff1_3="lofi")).speed_tsu


def test_devices_are_case_insensitive_and_unknown_names_list_the_legal_ones():
    assert device_for("n300").chips == 2 and device_for("t3k").chips == 8 and device_for("Tg").chips == 32
    assert normalise_device("150") == "N150" and normalise_device("galaxy") == "TG"
    with pytest.raises(ValueError, match="N150, N300, T3K, TG, P100, P150"):
        predict("Llama3.1-8B", "X9")
    with pytest.raises(ValueError, match="legal dp"):
        predict("Llama3.1-8B", "T3K", dp=3)


# --- shapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Llama3.2-1B", "Llama3.2-3B", "Llama3.1-8B", "Llama3.2-11B", "Llama3.1-70B",
                                  "Llama3.2-90B", "Qwen2.5-7B", "Qwen2.5-72B", "Phi3.5-mini",
                                  "Phi-3-mini-128k-instruct", "smollm2-135m"])
def test_every_seed_model_has_a_shape(name):
    s = shape_for(name)
    assert s.n_heads % s.n_kv_heads == 0 and s.head_dim * s.n_heads >= s.hidden // 2
    if s.not_covered:
        with pytest.raises(NotCovered, match=s.name):
            predict(name, "T3K")
    else:
        assert predict(name, "T3K").speed_tsu > 0


def test_shape_parameter_counts_match_the_public_sizes():
    assert shape_for("Llama3.1-8B").params == pytest.approx(8.03e9, rel=0.01)
    assert shape_for("Llama3.2-1B").params == pytest.approx(1.24e9, rel=0.01)
    assert shape_for("Llama3.1-70B").params == pytest.approx(70.6e9, rel=0.01)
    assert shape_for("Qwen2.5-7B").params == pytest.approx(7.6e9, rel=0.02)
    assert shape_for("HuggingFaceTB/SmolLM2-135M").params == pytest.approx(134.5e6, rel=0.01)
    assert shape_for("meta-llama/Llama-3.2-90B-Vision-Instruct").cross_attention_layers == 20


def test_shape_from_hf_directory_spec_and_registry(tmp_path, monkeypatch):
    cfg = {"model_type": "mllama", "text_config": {
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 40,
        "intermediate_size": 14336, "vocab_size": 128256, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = shape_for(str(tmp_path))
    assert (s.n_layers, s.cross_attention_layers, s.head_dim) == (32, 8, 128)
    assert predict(str(tmp_path), "N300").speed_tsu == pytest.approx(predict("Llama3.2-11B", "N300").speed_tsu)
    spec = ModelSpec(name="x", arch="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                     intermediate=128, vocab=256)
    assert shape_for(spec) is spec
    import engine.models.loaders

    monkeypatch.setattr(engine.models.loaders, "model_spec", lambda name, cache=None: spec)
    assert shape_for("tiny-llama").hidden == 64
    monkeypatch.setattr(engine.models.loaders, "model_spec", lambda name, cache=None: (_ for _ in ()).throw(KeyError(name)))
    with pytest.raises(ValueError, match="Llama3.1-8B"):
        shape_for("no-such-model")


# --- calibration -----------------------------------------------------------------------------
def test_parser_reads_every_n150_n300_and_t3k_row_of_the_seed():
    parsed = cal.parse_file(SEED)
    rows = parsed.rows
    assert len(rows) == 83
    assert [sum(r.device == d for r in rows) for d in ("N150", "N300", "T3K", "TG")] == [17, 36, 30, 0]
    assert sum(r.speed is not None for r in rows) == 83 and sum(r.ttft is not None for r in rows) == 79
    assert len(parsed.skipped_empty) == 4  # Qwen2.5-7B / -72B long-context and batch-32 rows are empty
    assert sorted((r.model, r.dp) for r in rows if r.dp > 1) == [
        ("Llama3.1-8B", 4), ("Llama3.1-8B", 8), ("Llama3.2-1B", 4), ("Llama3.2-1B", 8)]
    by_section = {}
    for r in rows:
        by_section.setdefault((r.config if r.harness == "demo" else "config-string", r.batch, r.prefill), []).append(r)
    assert {k: len(v) for k, v in by_section.items()} == {
        ("performance", 1, 128): 24, ("accuracy", 1, 128): 20, ("performance", 1, 65536): 12,
        ("performance", 1, 32768): 1, ("performance", 32, 128): 14, ("config-string", 1, 128): 12}
    phi = [r for r in rows if r.batch == 32 and r.model.startswith("Phi-3") and r.device == "N150"]
    assert len(phi) == 1 and "150" in phi[0].note
    assert all(r.decode == 200 for r in rows)
    for r in rows:
        if r.harness == "pareto":
            Config.parse(r.config)  # the section header is the config


def test_calibration_refuses_tg_rows_and_fits_t3k(tmp_path):
    with pytest.raises(ValueError, match="TG"):
        cal.fit([cal.Row(model="Llama3.1-8B", device="TG", config="performance", dp=32, speed=20.0)])
    md = tmp_path / "mine.md"
    md.write_text(
        "## Performance\n\n**Batch_size=1 and prefill_length is 128 tokens.**\n\n"
        "| Model | Device | Speed (t/s/u) | TTFT (ms) |\n|---|---|---|---|\n"
        "| Llama3.2-1B | N150 | 84.5 | 26 |\n| Llama3.1-8B | N150 | 27.8 | 107 |\n"
        "| Llama3.1-8B | N300 | 43.3 | 68 |\n| Llama3.1-8B | T3K | 62.3 | 52 |\n"
        "| Llama3.2-90B | T3K | 6 | 5535 |\n| Llama3.1-8B | TG (DP=32) | 20.0 | 100 |\n"
    )
    out = tmp_path / "params.json"
    result = cal.calibrate([md], out=out, cross_validation=False)
    assert len(result["held_back"]) == 1 and len(result["refused"]) == 1
    data = json.loads(out.read_text())
    assert data["calibration"]["rows_used"] == 4
    assert {r["device"] for r in data["rows"]} == {"N150", "N300", "T3K"}
    assert any("Llama3.2-90B" in n for n in data["calibration"]["notes"])


def test_committed_parameter_file_reproduces_the_printed_mape():
    meta = params_metadata()["calibration"]
    rows = cal.rows_from_params()
    assert len(rows) == meta["rows_used"] == 81  # 83 seed rows less the two Llama3.2-90B rows (not covered)
    assert meta["devices"] == ["N150", "N300", "T3K"]
    assert not [r for r in rows if r.device in cal.HELD_BACK]
    rep = cal.errors(rows, load_params(), fit_pareto_ttft=meta["fit_pareto_ttft"])
    for k in ("speed", "ttft", "ttft_all_rows"):
        assert rep["mape"][k] == pytest.approx(meta["mape"][k], abs=1e-6), k
    assert rep["worst"]["speed"]["row"] == meta["worst"]["speed"]["row"]
    # the targets on the calibration rows (N150 + N300 + T3K): speed <= 8%, TTFT <= 15%
    assert meta["mape"]["speed"] <= 8.0 and meta["mape"]["ttft"] <= 15.0
    assert set(meta["lodo"]) == {"N150", "N300", "T3K"} and len(meta["lomo"]) == 9
    assert meta["source"].endswith("PERF-seed.md")
    note = calibration_note()
    assert "81" in note and "N150/N300/T3K" in note and f"{meta['mape']['speed']:.1f}%" in note
    assert "leave-one-device-out" in note and "TG" in note


def test_parameter_file_is_what_calibrate_writes():
    data = json.loads(PARAMS_FILE.read_text())
    assert set(data) >= {"params", "fitted", "calibration", "rows"}
    assert set(data["fitted"]) == set(cal.FIT_PARAMS)
    assert all(v > 0 for v in data["params"].values())


# --- command line ----------------------------------------------------------------------------
def test_sweep_perf_json(capsys):
    from sweep.cli import main

    assert main(["perf", "--model", "Llama3.1-8B", "--device", "N300", "--config", "performance",
                 "--batch", "1", "--prefill", "128", "--decode", "200", "--dp", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"speed_tsu", "ttft_ms", "breakdown"} <= set(out)
    assert out["speed_tsu"] == pytest.approx(predict("Llama3.1-8B", "N300").speed_tsu)
    assert main(["perf", "--model", "Llama3.1-8B", "--device", "X9"]) == 2


def test_sweep_perf_table_lists_seed_rows_and_held_back_predictions(capsys):
    from sweep.cli import main

    assert main(["perf", "table", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "## Performance" in text and "## Short-Context, Batch-32" in text
    assert "| Llama3.1-70B" in text and "TG (DP=32)" in text and "T3K (DP=8)" in text
    line = next(l for l in text.splitlines() if l.startswith("| Llama3.1-8B") and "| T3K " in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    lo, hi = map(float, cells[3].split("-"))
    assert lo < float(cells[2]) < hi and cells[4] == "62.3" and cells[5].startswith(("+", "-"))
    assert "| Llama3.2-90B" in text and "not covered" in text
    assert "T3K (calibration" in text and calibration_note().split(",")[0] in text


def test_sweep_bench_passes_flags_to_the_scripts(monkeypatch):
    """`sweep bench perf --quick` runs bench/bench_perf.py with --quick (README's spelling)."""
    import runpy

    from sweep.cli import main as cli_main

    ran = []
    monkeypatch.setattr(runpy, "run_path", lambda path, run_name: ran.append((Path(path).name, sys.argv[1:])))
    assert cli_main(["bench", "perf", "--quick"]) == 0
    assert cli_main(["bench", "all", "--quick"]) == 0
    assert ran == [("bench_perf.py", ["--quick"])] + [(f"bench_{s}.py", ["--quick"]) for s in ("numerics", "engine", "perf", "sweep")]
