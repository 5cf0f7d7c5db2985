"""Tiny random test models (`tiny-llama`, `tiny-qwen2`, `tiny-phi3`): built once with transformers
from a fixed seed, saved as Hugging Face directories under the cache, then loaded like any directory."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.models.loaders.common import BYTE_TOKENIZER_FILE, UnknownModel, cache_dir

TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-phi3")
TINY_RECIPE_VERSION = 4  # bump when _tiny_config / build_tiny_model change (the cache key also hashes _TINY_COMMON)


_TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2, rms_norm_eps=1e-5,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
TINY_PHI3_ROPE_ORIG = 32
_TINY_SEEDS = {"tiny-llama": 1234, "tiny-qwen2": 2345, "tiny-phi3": 3456}


def _tiny_config(name: str):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    if name == "tiny-llama":
        return LlamaConfig(**_TINY_COMMON, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256})
    if name == "tiny-qwen2":
        return Qwen2Config(**_TINY_COMMON, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)
    if name == "tiny-phi3":  # longrope like Phi-3 / Phi-3.5 128k (pretraining length 32) and a 40-token
        # sliding window like Phi-3-mini-4k: tests cross both
        return Phi3Config(**_TINY_COMMON, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=40,
                          original_max_position_embeddings=TINY_PHI3_ROPE_ORIG, rope_scaling={
                              "type": "longrope", "factor": 2048 / TINY_PHI3_ROPE_ORIG,  # (transformers asks for it)
                              "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                              "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5]})
    raise UnknownModel(f"unknown tiny model {name!r}; tiny models: {', '.join(TINY_MODELS)}")


def build_tiny_model(name: str, out_dir: str | os.PathLike) -> Path:
    """Build a tiny random model with transformers (fixed seed) and save it as an HF directory.

    Norm weights are randomised around 1 and biases drawn too, so that every tensor matters.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _tiny_config(name)
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEEDS[name])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        g = torch.Generator().manual_seed(_TINY_SEEDS[name] + 1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))
                elif pname.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (out / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "utf-8 bytes", "vocab_size": 256}) + "\n")
    return out


def tiny_model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached HF directory of a tiny model, built on first use (atomic rename: safe with
    several processes)."""
    name = name.strip().lower()
    if name not in TINY_MODELS:
        raise UnknownModel(f"unknown tiny model {name!r}; tiny models: {', '.join(TINY_MODELS)}")
    recipe = json.dumps([TINY_RECIPE_VERSION, _TINY_COMMON, _TINY_SEEDS[name]], sort_keys=True)
    target = cache_dir(cache) / "models" / f"{name}-v{TINY_RECIPE_VERSION}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    if (target / BYTE_TOKENIZER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_model(name, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # built concurrently by another process
            if not (target / BYTE_TOKENIZER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
