"""Random-weight Hugging Face checkpoints of real model shapes, for memory and speed benchmarks
and the tests of layer-streamed evaluation.

`write_checkpoint(out, shape)` writes config.json, bf16 safetensors shards (a
`model.safetensors.index.json` when there is more than one) and the byte tokenizer marker, one
shard at a time: memory stays near one shard whatever the model's size. Shapes come from
`engine.models.shapes` (the seed's models as their config.json gives them), optionally with fewer
layers (the 70B shape cut to a few layers, extrapolated per layer). Values: N(0, 0.02) matrices
(the usual initializer), norm weights 1 + N(0, 0.1), biases N(0, 0.02); fixed seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from engine.models.loaders import BYTE_TOKENIZER_FILE
from engine.models.shapes import shape_for
from engine.models.spec import ModelSpec

SHARD_BYTES = 2 << 30
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def hf_config(shape: ModelSpec) -> dict:
    """config.json of a Llama (or, with qkv bias, Qwen2) model of `shape`."""
    qwen = shape.qkv_bias
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": shape.vocab, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads, "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_seq, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": shape.tied_embeddings, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if qwen:
        cfg |= {"rope_theta": 1000000.0, "use_sliding_window": False}
    else:
        cfg |= {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE), "attention_bias": False, "mlp_bias": False}
    return cfg


def tensor_shapes(shape: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in file order (embedding, layers, norm, head)."""
    h, q, kv = shape.hidden, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for i in range(shape.n_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (shape.intermediate, h), p + "mlp.up_proj.weight": (shape.intermediate, h),
                p + "mlp.down_proj.weight": (h, shape.intermediate)}
        if shape.qkv_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
    out["model.norm.weight"] = (h,)
    if not shape.tied_embeddings:
        out["lm_head.weight"] = (shape.vocab, h)
    return out


def _value(name: str, dims: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    t = torch.randn(dims, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
        t = t.mul_(0.1).add_(1.0)
    else:
        t = t.mul_(0.02)
    return t.to(torch.bfloat16)


def write_checkpoint(out: str | os.PathLike, model: str | ModelSpec, n_layers: int | None = None, seed: int = 0,
                     shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random-weight checkpoint of `model`'s shape (optionally `n_layers` layers) to `out`."""
    from safetensors.torch import save_file

    shape = shape_for(model)
    if n_layers is not None:
        shape = replace(shape, n_layers=int(n_layers))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(shape), indent=2) + "\n")
    (out / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "utf-8 bytes", "vocab_size": 256}) + "\n")
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = tensor_shapes(shape)
    files: list[str] = []

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            files.append(f"shard-{len(files):05d}.safetensors")
            save_file(shards[-1], str(out / files[-1]), metadata={"format": "pt"})
            shards[-1] = {}
            size = 0

    where: dict[str, int] = {}
    for name, dims in names.items():
        t = _value(name, dims, g)
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        shards[-1][name] = t
        where[name] = len(files)
        size += t.numel() * 2
    flush()
    if len(files) == 1:
        os.replace(out / files[0], out / "model.safetensors")
    else:
        total = sum(names[n][0] * (names[n][1] if len(names[n]) > 1 else 1) for n in names) * 2
        index = {"metadata": {"total_size": total}, "weight_map": {n: files[where[n]] for n in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
