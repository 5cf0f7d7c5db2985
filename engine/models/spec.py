"""ModelSpec: THE description of a Llama-family decoder (hyperparameters, shape, provenance), shared
by the loaders, the model, the reference and the performance model; `from_hf_config` is the one
config.json parser (engine.models.shapes holds the table of the seed's models)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

SUPPORTED_HF = ("llama", "mistral", "qwen2", "phi3")  # model_type values the engine runs
DEFAULT_CHUNK_K = 4  # tt_transformers' prefill chunk fallback, in units of 1024 tokens


class ModelFormatError(ValueError):
    """A checkpoint the engine cannot read or run: the message names the file and the problem."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry or display name
    arch: str  # "llama", "qwen2" or "phi3" (weight layout family)
    n_layers: int  # decoder layers a text prompt runs through
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)  # HF rope scaling (linear, llama3, longrope)
    rms_eps: float = 1e-5
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    max_seq: int = 8192  # context: max_position_embeddings
    sliding_window: int | None = None  # attention sees the last `sliding_window` positions (Mistral, Phi-3)
    cross_attention_layers: int = 0  # Llama 3.2 Vision: held in memory, not run for text prompts
    # provenance and performance-model facts (not part of the model's identity)
    source: str = field(default="", compare=False)
    prefill_chunk_k: tuple[tuple[str, int | None], ...] = field(default=(), compare=False)  # tt_transformers, per device
    not_covered: str = field(default="", compare=False)  # why the performance model refuses this model ("" = covered)

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


def _rope(cfg: Mapping[str, Any], path: Any) -> tuple[float, dict | None]:
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


def from_hf_config(cfg: Mapping[str, Any], name: str, path: Any = ".", runnable: bool = True) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json dict. `runnable`: the engine will run it, so an
    architecture or feature it does not emulate is a ModelFormatError naming it; without, only the
    shape matters (the performance model): any decoder-only config, a vision model's text_config
    (its cross-attention layers counted apart)."""
    outer = cfg
    if not runnable and isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg["text_config"]}
    mtype = str(cfg.get("model_type", outer.get("model_type", "")))
    if runnable and mtype not in SUPPORTED_HF:
        raise ModelFormatError(f"{path}: model_type {mtype!r} is not supported ({', '.join(SUPPORTED_HF)})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise ModelFormatError(f"{path}/config.json lacks {key!r}; expected a decoder-only transformer config")
    if runnable:
        _check_runnable(cfg, mtype, path)
        theta, scaling = _rope(cfg, path)
    else:
        theta, scaling = float(cfg.get("rope_theta", 10000.0)), None
    window = cfg.get("sliding_window")
    if mtype.startswith("qwen2"):  # Qwen2 applies its window only with use_sliding_window, from layer max_window_layers on
        if runnable and window and cfg.get("use_sliding_window"):
            raise ModelFormatError(f"{path}: Qwen2 sliding-window attention (use_sliding_window) is not supported")
        window = None
    hidden, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    cross = len(cfg.get("cross_attention_layers") or [])
    return ModelSpec(
        name=name,
        arch="llama" if mtype in ("mistral", "mllama", "") else mtype,
        n_layers=int(cfg["num_hidden_layers"]) - cross, hidden=hidden, n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        rope_theta=theta, rope_scaling=scaling, rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", outer.get("tie_word_embeddings", False))),
        qkv_bias=bool(cfg.get("attention_bias", mtype.startswith("qwen2"))) if not runnable else mtype == "qwen2",
        max_seq=int(cfg.get("max_position_embeddings") or 8192),
        sliding_window=int(window) if window else None, cross_attention_layers=cross, source=f"{path}/config.json",
    )


def _check_runnable(cfg: Mapping[str, Any], mtype: str, path: Any) -> None:
    if cfg.get("mlp_bias"):
        raise ModelFormatError(f"{path}: MLP biases are not supported")
    if mtype in ("llama", "mistral") and cfg.get("attention_bias"):
        raise ModelFormatError(f"{path}: Llama attention biases (incl. o_proj) are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(f"{path}: activation {act!r} is not supported (silu)")
