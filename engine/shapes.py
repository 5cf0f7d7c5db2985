"""Model shapes for the performance model: the handful of numbers that set bytes and FLOPs.

`shape_for(x)` accepts a seed model name exactly as the seed's tables write it (`Llama3.1-8B`,
`Phi-3-mini-128k-instruct`), a Hugging Face id or alias (`meta-llama/Llama-3.1-8B-Instruct`,
`smollm2-135m`), a local directory (or file) holding a Hugging Face `config.json`, a `ModelSpec`
(or anything with its fields), or a registry name that `engine.loaders.model_spec` knows (tiny
random test models). The table lives in `engine/data/model_shapes.json`; the values are the public
config.json values of each model.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

DATA = Path(__file__).resolve().parent / "data" / "model_shapes.json"


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int  # decoder layers a text prompt runs through
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False
    cross_attention_layers: int = 0  # Llama 3.2 Vision: held in memory, not run for text prompts
    source: str = ""
    context: int = field(default=0, compare=False)  # max_position_embeddings (0 = unknown); no bytes or FLOPs
    prefill_chunk_k: tuple[tuple[str, int | None], ...] = ()  # (device, chunk / 1024 tokens) from tt_transformers
    not_covered: str = ""  # why the performance model refuses this model ("" = covered)

    # --- per-layer weight element counts (full model, before tensor parallelism) ------------
    @property
    def qkv_out(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim

    def layer_weights(self) -> dict[str, int]:
        """Elements per weight group of one decoder layer (ff1_3 counts w1 and w3 together)."""
        return {
            "wqkv": self.hidden * self.qkv_out,
            "wo": self.attn_width * self.hidden,
            "ff1_3": 2 * self.hidden * self.intermediate,
            "ff2": self.intermediate * self.hidden,
        }

    @property
    def params(self) -> int:
        """Parameters of the layers a text prompt runs through plus embeddings (tied counted once)."""
        per_layer = sum(self.layer_weights().values()) + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + emb + self.hidden

    def prefill_chunk(self, device: str) -> int | None:
        """Tokens per prefill chunk on `device` (tt_transformers' MAX_PREFILL_CHUNK_SIZES_DIV1024;
        4K, its compatibility fallback, for a model or device that table lacks; None = too big)."""
        table = dict(self.prefill_chunk_k)
        if device not in table:
            return DEFAULT_CHUNK_K * 1024
        k = table[device]
        return None if k is None else int(k) * 1024

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_CHUNK_K = 4


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, ModelShape], dict[str, str]]:
    data = json.loads(DATA.read_text())
    shapes: dict[str, ModelShape] = {}
    index: dict[str, str] = {}
    fields = set(ModelShape.__dataclass_fields__)
    for entry in data["models"]:
        values = {k: v for k, v in entry.items() if k in fields}
        values["prefill_chunk_k"] = tuple(sorted((entry.get("prefill_chunk_k") or {}).items()))
        shape = ModelShape(**values, source=f"config.json of {entry.get('hf', entry['name'])}")
        shapes[shape.name] = shape
        for alias in [shape.name, entry.get("hf", ""), entry.get("hf", "").split("/")[-1], *entry.get("aliases", [])]:
            if alias:
                index.setdefault(_norm(alias), shape.name)
    return shapes, index


def known_models() -> list[str]:
    """The names in the shape table, in table order."""
    return list(_table()[0])


def from_hf_config(cfg: Mapping[str, Any], name: str = "", source: str = "") -> ModelShape:
    """A shape from a Hugging Face config.json dict (llama, mistral, qwen2, phi3, mllama ...)."""
    outer = cfg
    if "text_config" in cfg and isinstance(cfg["text_config"], Mapping):
        cfg = {**cfg["text_config"]}
    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        intermediate = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]!r}; expected a decoder-only transformer config") from None
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    cross = len(cfg.get("cross_attention_layers") or [])
    tied = bool(cfg.get("tie_word_embeddings", outer.get("tie_word_embeddings", False)))
    model_type = str(cfg.get("model_type", outer.get("model_type", "")))
    bias = bool(cfg.get("attention_bias", model_type.startswith("qwen2")))
    return ModelShape(
        name=name or str(outer.get("_name_or_path") or model_type or "hf-model"),
        n_layers=layers - cross, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        intermediate=intermediate, vocab=vocab, tied_embeddings=tied, qkv_bias=bias,
        cross_attention_layers=cross, source=source or "config.json",
        context=int(cfg.get("max_position_embeddings") or 0),
    )


def from_spec(spec: Any) -> ModelShape:
    """A shape from a ModelSpec (or any object with its fields)."""
    return ModelShape(
        name=str(getattr(spec, "name", "model")),
        n_layers=int(spec.n_layers), hidden=int(spec.hidden), n_heads=int(spec.n_heads),
        n_kv_heads=int(spec.n_kv_heads), head_dim=int(spec.head_dim), intermediate=int(spec.intermediate),
        vocab=int(spec.vocab), tied_embeddings=bool(getattr(spec, "tied_embeddings", False)),
        qkv_bias=bool(getattr(spec, "qkv_bias", False)), source="ModelSpec",
        context=int(getattr(spec, "max_seq", 0) or 0),
    )


def check_context(shape: ModelShape, prefill: int, decode: int, what: str = "prefill + decode") -> None:
    """Refuse a run longer than the model's context (prefill + decode tokens in the KV cache)."""
    if shape.context and prefill + decode > shape.context:
        raise ValueError(f"{what} = {prefill} + {decode} = {prefill + decode} tokens exceeds {shape.name}'s context of "
                         f"{shape.context}; use at most {max(0, shape.context - decode)} prefill tokens with {decode} decode")


_SPEC_FIELDS = ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab")


def shape_for(model: Any) -> ModelShape:
    """The shape of a model given by name, HF id, local config.json directory, ModelSpec or ModelShape."""
    if isinstance(model, ModelShape):
        return model
    if all(hasattr(model, f) for f in _SPEC_FIELDS):
        return from_spec(model)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"shape_for wants a model name, a path or a ModelSpec, not {type(model).__name__}")
    text = str(model)
    shapes, index = _table()
    hit = index.get(_norm(text))
    if hit:
        return shapes[hit]
    path = Path(text).expanduser()
    cfg_file = path / "config.json" if path.is_dir() else path
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from None
        return from_hf_config(cfg, name=path.name if path.is_dir() else path.parent.name, source=str(cfg_file))
    try:  # registry names (tiny random models, GGUF files): the loaders know their specs
        from engine.loaders import model_spec
    except ImportError:
        model_spec = None
    if model_spec is not None:
        try:
            return from_spec(model_spec(text))
        except Exception:  # noqa: BLE001 - fall through to the helpful error below
            pass
    raise ValueError(
        f"unknown model {text!r}; known models: {', '.join(known_models())} "
        "(or a registry name, a Hugging Face directory with config.json, or a ModelSpec)"
    )
