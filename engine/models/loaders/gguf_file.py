"""GGUF files (llama.cpp): the header parsed by hand, tensors dequantized with `gguf.quants`, names
mapped to the canonical layout, Llama Q/K rows un-permuted, the tokenizer built by transformers."""
from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.loaders.common import LoadedModel, _file_fingerprint, cache_dir, check_weights
from engine.models.spec import ModelFormatError, ModelSpec

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




# --- the source interface (engine.models.loaders.SOURCES) ---------------------------------------
def spec(path: Path, name: str) -> ModelSpec:
    header = read_gguf_header(path)
    return _gguf_spec(header.meta, header.tensors, name, path)


def load(path: Path, name: str, cache: str | os.PathLike | None = None) -> LoadedModel:
    return load_gguf(path, name=name, cache=cache)


def check(path: Path, name: str) -> None:
    """The header and tensor table parse (read_gguf_header checks each tensor's extent)."""
    read_gguf_header(path)
