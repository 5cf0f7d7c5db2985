"""The independent fp32 reference: the checkpoint run by transformers' own modules, whole or
streamed one decoder layer at a time in bounded memory.

`reference_model` builds the whole fp32 model (Hugging Face directories with `from_pretrained` in
their original layout; GGUF models rebuilt from the spec and the loader's dequantized weights).
`streamed_model` builds the same transformers model on the meta device and reads each decoder
layer's weights from the checkpoint (`LoadedModel.raw`, the checkpoint's own names) in a forward
pre-hook, dropping them after the layer: the same modules run the same ops on the same values, so
the logits are those of the whole model, while peak memory holds one layer. The embedding is a row
gather from the store and the LM head a linear layer read and applied in vocabulary chunks (each
logit is one dot product; the chunking changes no operand). accelerate's hooks would do the same
job, but the reference stays free of it (tests/test_reproducible.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine.models import loaders
from engine.models.spec import ModelSpec
from engine.models.store import WeightStore, give_back_memory, vocab_chunks


def hf_config_from_spec(spec: ModelSpec):
    """A transformers config equivalent to `spec` (used for GGUF models)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_seq, rms_norm_eps=spec.rms_eps,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tied_embeddings,
    )
    if spec.rope_scaling:
        common["rope_scaling"] = dict(spec.rope_scaling)
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"no transformers config for arch {spec.arch!r} from a spec; load it from its HF directory")


def _no_init():
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def hf_config(loaded: loaders.LoadedModel):
    """The transformers config of the checkpoint (its own config.json, or one built from the spec)."""
    if loaded.kind == "hf":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(loaded.source)
    return hf_config_from_spec(loaded.spec)


def reference_model(loaded: loaders.LoadedModel):
    """The whole fp32 transformers model of the same weights (eval mode)."""
    from transformers import AutoModelForCausalLM

    with _quiet():
        if loaded.kind == "hf":
            model = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32)
        else:
            with _no_init():
                model = AutoModelForCausalLM.from_config(hf_config(loaded), dtype=torch.float32)
            missing, unexpected = model.load_state_dict(loaded.weights, strict=False, assign=True)  # shares, no copy
            allowed_missing = {"lm_head.weight"} if loaded.spec.tied_embeddings else set()
            if set(missing) - allowed_missing or unexpected:
                raise RuntimeError(f"reference model: missing {missing}, unexpected {unexpected}")
            if loaded.spec.tied_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class RowGather(nn.Module):
    """An embedding that reads only the rows it is asked for from the store."""

    def __init__(self, store: WeightStore, name: str):
        super().__init__()
        self.store, self.name = store, name

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.store.rows(self.name, ids.reshape(-1)).reshape(*ids.shape, -1)


class ChunkedHead(nn.Module):
    """A bias-free linear layer whose [vocab, hidden] weight is read and applied in row chunks."""

    def __init__(self, store: WeightStore, name: str):
        super().__init__()
        self.store, self.name = store, name
        self.chunks = vocab_chunks(*store.shape(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, self.store.row_block(self.name, a, b)) for a, b in self.chunks], -1)


def _load_layer(prefix: str, store: WeightStore):
    def hook(module: nn.Module, args, kwargs=None):
        sd = {k: store[prefix + k] for k in module.state_dict()}
        module.load_state_dict(sd, strict=True, assign=True)

    return hook


def _drop_layer(module: nn.Module, args, output) -> None:
    module.to("meta")  # the layer's weights are freed; the next call reads them again
    give_back_memory()


def streamed_model(loaded: loaders.LoadedModel):
    """The transformers model of `loaded` with no weight in memory until a layer runs."""
    from transformers import AutoModelForCausalLM

    config = hf_config(loaded)
    store = loaded.raw
    with _quiet(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    base = model.model
    base.rotary_emb = type(base.rotary_emb)(config=config)  # its buffers are computed, not read: on the host
    base.norm.load_state_dict({"weight": store["model.norm.weight"]}, assign=True)
    base.embed_tokens = RowGather(store, "model.embed_tokens.weight")
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in store
    model.lm_head = ChunkedHead(store, "model.embed_tokens.weight" if tied else "lm_head.weight")
    for i, layer in enumerate(base.layers):
        layer.register_forward_pre_hook(_load_layer(f"model.layers.{i}.", store))
        layer.register_forward_hook(_drop_layer)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta and not n.startswith("model.layers.")]
    if left:
        raise RuntimeError(f"streamed reference: tensors not loaded: {left[:5]}")
    return model


@torch.inference_mode()
def reference_logits(loaded: loaders.LoadedModel, tokens, model=None, streamed: bool = True) -> torch.Tensor:
    """fp32 transformers logits [T, vocab] for `tokens` (teacher-forced, one forward), layer by
    layer (`streamed_model`) unless `model` is given or `streamed` is False."""
    if model is None:
        model = streamed_model(loaded) if streamed else reference_model(loaded)
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].float()
