"""What every loader returns and shares: LoadedModel, the errors, the cache directory, the content
fingerprint, the byte tokenizer and the canonical tensor names and shapes a checkpoint must hold."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from engine.models.spec import ModelFormatError, ModelSpec
from engine.models.store import DictStore, WeightStore

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"  # marker: the directory's tokenizer is ByteTokenizer
__all__ = ["ModelFormatError"]


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
    """A model's spec, canonical fp32 weights (an `engine.models.store.WeightStore`, read on access for
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


