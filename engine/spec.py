"""ModelSpec: the hyperparameters of a Llama-family decoder, shared by the loaders, the model and
the performance model."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry or display name
    arch: str  # "llama", "qwen2" or "phi3" (weight layout family)
    n_layers: int
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
    max_seq: int = 8192
    sliding_window: int | None = None  # attention sees the last `sliding_window` positions (Mistral, Phi-3)

    @property
    def params(self) -> int:
        """Parameter count (embeddings counted once when tied): the performance model's count."""
        from engine.shapes import from_spec

        return from_spec(self).params
