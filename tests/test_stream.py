"""Layer-streamed evaluation (issue 21): the layer-major window equals the model-major trial bit
for bit, streamed weights and a chunked LM head change no bit, anchors resume exactly, the
streamed fp32 reference equals the whole transformers model, the disk weight cache round-trips
and stays bounded, and peak memory does not grow with the number of layers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import engine.models.model as em
from engine.accuracy.evaluator import Evaluator, reference_logits, window_tokens
from engine.models import loaders
from engine.models.weight_cache import WeightCache
from engine.vocab.config import ModelConfig

P, D = 48, 47
CONFIGS = ["defaults", "performance", "accuracy", "reference"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evs():
    return {name: Evaluator(name, prefill=P, decode=D) for name in loaders.TINY_MODELS}


def _mixed(ev) -> ModelConfig:
    """Layer 0 under `performance`, the rest under `accuracy`: a per-layer config."""
    perf, acc = ev.model_config("performance"), ev.model_config("accuracy")
    return ModelConfig((perf.layers[0], *acc.layers[1:]))


@pytest.mark.parametrize("name", sorted(loaders.TINY_MODELS))
@pytest.mark.parametrize("config", CONFIGS + ["mixed"])
def test_layer_major_window_is_the_model_major_trial(evs, name, config):
    ev = evs[name]
    cfg = _mixed(ev) if config == "mixed" else config
    assert torch.equal(ev.run(cfg), ev.run_two_pass(cfg))


def test_smollm2_layer_major_window_is_the_model_major_trial(smollm2_evaluator):
    """The real model on a 128 + 127 window of its evaluation tokens (the full window: bench)."""
    model, tokens = smollm2_evaluator.model, smollm2_evaluator.tokens[:255]
    mc = smollm2_evaluator.model_config("performance")
    last, logits, _ = model.run_window(tokens, 128, mc)
    want_last, cache = model.prefill(tokens[:128], mc, capacity=255)
    assert torch.equal(last, want_last) and torch.equal(logits, model.decode_batched(tokens[128:], cache, mc))


@pytest.mark.parametrize("name", sorted(loaders.TINY_MODELS))
def test_streamed_weights_and_prefetch_change_no_bit(evs, name):
    ev = evs[name]
    want = ev.run("performance")
    streamed = Evaluator(name, prefill=P, decode=D, stream=True)
    assert streamed.stream and not streamed.model.keep_weights
    for prefetch in (False, True):
        streamed.model.prefetch = prefetch
        assert torch.equal(streamed.run("performance"), want)
        layer_keys = [k for k in streamed.model._cache if k[0][0].isdigit() or k[0].startswith("model.layers.")]
        assert layer_keys == []  # every decoder layer's weights were released after the layer


def test_lm_head_vocabulary_chunks_change_no_bit(evs, monkeypatch):
    ev = evs["tiny-llama"]
    want = {c: ev.run(c) for c in ("performance", "reference")}
    monkeypatch.setattr(em, "LM_HEAD_CHUNK_BYTES", 4 * ev.spec.hidden * 64)  # 64 vocabulary rows a chunk
    ev.model.clear_cache()
    assert len(ev.model.lm_head_chunks()) == ev.spec.vocab // 64
    assert all((b - a) % 32 == 0 for a, b in ev.model.lm_head_chunks())  # no bfp block straddles two chunks
    for c, logits in want.items():
        assert torch.equal(ev.run(c), logits)
    monkeypatch.undo()
    ev.model.clear_cache()


def test_anchor_resumes_at_the_first_changed_layer(monkeypatch):
    ev = Evaluator("tiny-qwen2", prefill=P, decode=D)
    base = ev.model_config("defaults")
    perf = ev.model_config("performance")
    probes = [ModelConfig(tuple(perf.layers[i] if i == L else c for i, c in enumerate(base.layers)))
              for L in range(ev.spec.n_layers)]
    want = [ev.run(p) for p in probes]
    ev.set_anchor(base)
    calls = []
    real = ev.model.layer_forward
    monkeypatch.setattr(ev.model, "layer_forward", lambda i, *a, **k: calls.append(i) or real(i, *a, **k))
    for L, p in enumerate(probes):
        calls.clear()
        assert torch.equal(ev.run(p), want[L])
        assert calls == list(range(L, ev.spec.n_layers))  # the probe recomputes from its layer on
    calls.clear()
    full = ev.model_config("reference")  # every layer full: the embedding's dtype differs, nothing reused
    ev.run(full)
    assert calls == list(range(ev.spec.n_layers))
    ev.set_anchor(None)


@pytest.mark.parametrize("name", sorted(loaders.TINY_MODELS))
def test_streamed_reference_is_the_whole_model(name):
    loaded = loaders.load(name)
    tokens = window_tokens(loaded.tokenizer, 300, 0)
    whole = reference_logits(loaded, tokens, streamed=False)
    assert torch.equal(reference_logits(loaded, tokens), whole)


def test_smollm2_streamed_reference_is_the_whole_model(smollm2_gguf):
    loaded = loaders.load("smollm2-135m")
    tokens = window_tokens(loaded.tokenizer, 160, 0)
    assert torch.equal(reference_logits(loaded, tokens), reference_logits(loaded, tokens, streamed=False))


def test_streamed_reference_reads_one_layer_at_a_time(monkeypatch):
    from engine.models import reference

    loaded = loaders.load("tiny-llama")
    model = reference.streamed_model(loaded)
    live = []
    layers = model.model.layers
    for layer in layers:
        layer.register_forward_pre_hook(  # runs after the loading pre-hook: what the layer's forward sees
            lambda m, a: live.append(sum(not p.is_meta for l2 in layers for p in l2.parameters())))
    reference_logits(loaded, list(range(1, 40)), model=model)
    per_layer = sum(1 for _ in layers[0].parameters())
    assert live == [per_layer] * len(layers)  # inside a layer's forward, only that layer holds weights
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # and none after


# --- the disk cache of quantized weights ---------------------------------------------------------
def test_weight_cache_round_trip_bound_and_torn_files(tmp_path):
    t = torch.randn(64, 96).to(torch.bfloat16)
    c = WeightCache(tmp_path, "fp", limit=10 * t.numel() * 2)
    assert c.get("0.wqkv", "bfp8") is None
    c.put("0.wqkv", "bfp8", t)
    got = c.get("0.wqkv", "bfp8")
    assert got.dtype == torch.bfloat16 and torch.equal(got, t) and (c.hits, c.misses) == (1, 1)
    c.put("lm_head[0:32]", "bfp4", t)
    assert torch.equal(c.get("lm_head[0:32]", "bfp4"), t)
    for i in range(30):  # far past the bound: least recently used entries go
        c.put(f"{i}.w2", "bf16", t)
    assert c.size <= c.limit and c.size == sum(p.stat().st_size for p in (tmp_path / "weights").rglob("*.safetensors"))
    assert c.get("0.wqkv", "bfp8") is None and c.get("29.w2", "bf16") is not None
    p = c._path("29.w2", "bf16")
    p.write_bytes(p.read_bytes()[:50])  # torn: dropped and recomputed, never trusted
    assert c.get("29.w2", "bf16") is None and not p.exists()
    off = WeightCache(tmp_path, "fp", limit=0)
    off.put("1.w2", "bf16", t)
    assert off.get("1.w2", "bf16") is None


def test_weight_cache_setting_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TTSWEEP_WEIGHT_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="TTSWEEP_WEIGHT_CACHE_GB"):
        WeightCache(tmp_path, "fp")
    monkeypatch.setenv("TTSWEEP_WEIGHT_CACHE_GB", "-1")
    with pytest.raises(ValueError, match=">= 0"):
        WeightCache(tmp_path, "fp")


def test_streamed_study_quantizes_each_weight_once(tmp_path, tiny_llama_dir):
    first = Evaluator(str(tiny_llama_dir), prefill=P, decode=D, cache_dir=tmp_path, stream=True)
    a = first.evaluate("performance")
    assert first.weight_cache.misses > 0 and first.weight_cache.hits == 0
    second = Evaluator(str(tiny_llama_dir), prefill=P, decode=D, cache_dir=tmp_path, stream=True)
    b = second.evaluate("performance")
    assert second.weight_cache.misses == 0 and second.weight_cache.hits == first.weight_cache.misses
    assert (a.top1, a.top5, a.kld) == (b.top1, b.top5, b.kld)
    kept = Evaluator(str(tiny_llama_dir), prefill=P, decode=D, cache_dir=tmp_path, stream=False)
    assert kept.weight_cache is None and torch.equal(kept.run("performance"), second.run("performance"))


def test_memory_budget_decides_streaming(monkeypatch):
    from engine.accuracy.evaluator import streams

    loaded = loaders.load("tiny-llama")
    monkeypatch.setenv("TTSWEEP_MEMORY_GB", "4")
    assert not streams(loaded)
    monkeypatch.setenv("TTSWEEP_MEMORY_GB", "0")
    assert streams(loaded)
    monkeypatch.setenv("TTSWEEP_MEMORY_GB", "big")
    with pytest.raises(ValueError, match="TTSWEEP_MEMORY_GB"):
        streams(loaded)


# --- the memory law ------------------------------------------------------------------------------
_CHILD = """
import json, sys
from engine.accuracy.evaluator import Evaluator
from engine.models.store import peak_rss_bytes
ev = Evaluator(sys.argv[1], prefill=32, decode=31, cache_dir=sys.argv[2])
ev.evaluate("performance")
print(json.dumps({"stream": ev.stream, "peak": peak_rss_bytes()}))
"""


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    """Same width, 4 and 32 decoder layers (0.04 and 0.25 GB of bf16 weights): peak RSS within 15%
    (measured 483 and 481 MiB; keeping the weights instead gives 331 and 574 MiB).
    Each run is a fresh process (reference and trial) with a memory budget that streams both."""
    from engine.models.spec import ModelSpec
    from engine.models.synthetic import write_checkpoint

    peaks = {}
    for n in (4, 32):
        shape = ModelSpec("law", arch="llama", n_layers=n, hidden=512, n_heads=8, n_kv_heads=2, head_dim=64,
                           intermediate=2048, vocab=4096)
        d = write_checkpoint(tmp_path / f"law{n}", shape, shard_bytes=64 << 20)
        env = {**__import__("os").environ, "TTSWEEP_MEMORY_GB": "0.05", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _CHILD, str(d), str(tmp_path / "cache")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["stream"]
        peaks[n] = r["peak"]
    assert abs(peaks[32] - peaks[4]) / peaks[4] < 0.15, peaks
    print(f"peak RSS: 4 layers {peaks[4] / 2**20:.0f} MiB, 32 layers {peaks[32] / 2**20:.0f} MiB")


def test_sweep_eval_streams_a_checkpoint_and_reports_its_weight_cache(capsys, monkeypatch, tmp_path, tiny_llama_dir):
    from sweep.cli import main

    monkeypatch.setenv("TTSWEEP_MEMORY_GB", "0")  # stream even a tiny model
    argv = ["eval", "--model", str(tiny_llama_dir), "--prefill", "16", "--decode", "15", "--cache-dir", str(tmp_path),
            "--config", "performance", "--json"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out))
    first, second = runs
    assert first["streamed"] and first["weight_cache_quantized"] > 0 and first["weight_cache_hits"] == 0
    assert second["weight_cache_quantized"] == 0 and second["weight_cache_hits"] == first["weight_cache_quantized"]
    assert second["weight_cache_bytes"] > 0 and (first["top1"], first["kld"]) == (second["top1"], second["kld"])


def test_readme_streaming_table_is_the_committed_benchmark():
    """The README's memory/time table is reports/stream/bench-stream.md as bench_stream.py wrote it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bench = json.loads((root / "reports" / "stream" / "bench-stream.json").read_text())
    table = (root / "reports" / "stream" / "bench-stream.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| Llama")]
    assert len(rows) == len(bench["rows"]) and all(r in (root / "README.md").read_text() for r in rows)
    for line, r in zip(rows, bench["rows"]):
        assert f"| {r['peak_gb']:.2f} |" in line
