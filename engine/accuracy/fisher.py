"""Cheap first-order (Fisher) sensitivity of per-layer config changes, without a whole trial per probe.

A measured sensitivity profile changes one (layer, group) choice of a base config at a time and
runs a whole trial for each. This module ranks the same probes from one fp32 forward + backward
and a run of the probed decoder layer alone:

1. The fp32 transformers reference (`engine.accuracy.evaluator.reference_model`, the model the reference
   log-probs come from) runs teacher-forced over the window's tokens 0..P+D (P + D + 1 tokens:
   the length at which a longrope model picks the reference's factors); the loss is the summed NLL
   of the true next token at the scored positions P..P+D-1 (targets P+1..P+D, as
   `engine.accuracy.evaluator.score_tokens` aligns them). Captured per decoder layer L: its input h_L and
   g_L = dLoss / d(output of layer L), each [P + D, hidden].
2. Per (layer, config): `Model.layer_forward` runs layer L alone under the config on h_L, split as
   a trial runs it (prefill op groups on positions < P with a fresh KV cache, decode op groups on
   positions >= P attending it); dy = y - y_fp32, where y_fp32 is the same call under
   `engine.vocab.config.REFERENCE` (so a fp32 / exact layer has dy = 0 exactly, and the error of the
   fp32 reference against itself never enters).
3. score = sum_t (g_t . dy_t)^2: the empirical Fisher's quadratic form of the output error, one
   rank-1 term per position (a first-order loss change g . dy per position, squared).

Every window of the Evaluator contributes (scores add). The layer's input is held in the dtype the
whole trial would hold it in (`Model.input_format` of the base config with the probe's layer
swapped in), so the layer's own rounding of its input is part of dy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from engine.accuracy.evaluator import reference_model
from engine.models.model import FULL
from engine.vocab.config import REFERENCE, Config, ModelConfig

if TYPE_CHECKING:
    from engine.accuracy.evaluator import Evaluator


@dataclass
class FisherProfile:
    """Fisher scores of probes; `deltas[i]` ranks probe i against the base on its layer."""

    scores: list[float]  # per probe, score of the probe's config at its layer
    base: list[float]  # per layer, score of the base config
    deltas: list[float]  # per probe, scores[i] - base[layer of probe i]
    seconds_backward: float  # the fp32 forward + backward (every window)
    seconds_probes: float  # the single-layer runs (fp32 outputs, base and probes)


@dataclass
class Activations:
    """One window's fp32 layer inputs h[L] and output gradients g[L], each [P + D, hidden]."""

    h: list[torch.Tensor]
    g: list[torch.Tensor]


def _hidden_of(x):
    """A decoder layer's hidden states from its output (a tensor, or a tuple whose first item it is)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def activations(hf, tokens: torch.Tensor, prefill: int, decode: int) -> Activations:
    """Forward + backward of the fp32 transformers model `hf` over tokens[:P+D+1]; the loss is the
    summed NLL of tokens P+1..P+D at positions P..P+D-1. Weights get no gradients (only the
    activations need them)."""
    T = prefill + decode
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if tokens.numel() < T + 1:
        raise ValueError(f"need {T + 1} tokens (prefill + decode + the last target), got {tokens.numel()}")
    ids = tokens[:T + 1][None]
    targets = tokens[prefill + 1:T + 1]
    layers = hf.model.layers
    ins: list[torch.Tensor | None] = [None] * len(layers)
    outs: list[torch.Tensor | None] = [None] * len(layers)

    def capture(index: int):
        def hook(module, args, kwargs, output):
            ins[index] = args[0] if args else kwargs["hidden_states"]
            outs[index] = _hidden_of(output)
        return hook

    handles = [layer.register_forward_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)  # the graph's only leaf
            hidden = hf.model(inputs_embeds=emb, use_cache=False).last_hidden_state[0]
            logits = hf.lm_head(hidden[prefill:T]).float()
            loss = F.cross_entropy(logits, targets, reduction="sum")
            grads = torch.autograd.grad(loss, outs)
    finally:
        for h in handles:
            h.remove()
    return Activations(h=[x[0, :T].detach() for x in ins], g=[x[0, :T].detach() for x in grads])


def fisher_score(g: torch.Tensor, dy: torch.Tensor) -> float:
    """sum_t (g_t . dy_t)^2 over positions t (float64)."""
    return float((g.double() * dy.double()).sum(-1).square().sum())


def _check_probes(probes: Sequence[tuple[int, Config]], n_layers: int) -> list[tuple[int, Config]]:
    out = []
    for k, probe in enumerate(probes):
        try:
            layer, cfg = probe
        except (TypeError, ValueError):
            raise ValueError(f"probe {k} must be a (layer index, Config) pair, got {probe!r}") from None
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"probe {k}: layer {layer!r} is not a layer index 0..{n_layers - 1}")
        if not isinstance(cfg, Config):
            raise TypeError(f"probe {k}: the config must be an engine.vocab.config.Config (the whole layer's), "
                            f"got {type(cfg).__name__}; use base[layer].replace(...)")
        out.append((layer, cfg))
    return out


def fisher_profile(ev: "Evaluator", base: ModelConfig | Config | str,
                   probes: Sequence[tuple[int, Config]]) -> FisherProfile:
    """Fisher scores of `probes` (layer index, the full Config that layer gets) against `base`
    over every window of `ev`; see the module docstring. Base scores cover every layer."""
    mc = ev.model_config(base)
    n = mc.n_layers
    probes = _check_probes(probes, n)
    model = ev.model
    P, D = ev.prefill, ev.decode
    by_layer: dict[int, list[int]] = {}
    for k, (layer, _) in enumerate(probes):
        by_layer.setdefault(layer, []).append(k)
    scores = [0.0] * len(probes)
    base_scores = [0.0] * n
    t_backward = t_probes = 0.0
    hf = reference_model(ev.loaded).to(model.device)
    for p in hf.parameters():
        p.requires_grad_(False)
    from engine.progress import bar

    steps = bar(total=len(ev.references) * (n + 1), desc="Fisher (backward, then layer by layer)", unit="step")
    for ref in ev.references:
        t0 = time.perf_counter()
        act = activations(hf, torch.from_numpy(ref.tokens.astype("int64")).to(model.device), P, D)
        t1 = time.perf_counter()
        t_backward += t1 - t0
        steps.update(1)
        for layer in range(n):
            steps.update(1)
            h, g = act.h[layer], act.g[layer]

            def output(cfg: Config, h_fmt: str, layer: int = layer, h: torch.Tensor = h) -> torch.Tensor:
                return torch.cat(model.layer_forward(layer, cfg, h[:P], h[P:], h_fmt=h_fmt))

            y_ref = output(REFERENCE, FULL)
            base_scores[layer] += fisher_score(g, output(mc[layer], model.input_format(mc, layer)) - y_ref)
            for k in by_layer.get(layer, ()):
                cfg = probes[k][1]
                swapped = mc.layers[:layer] + (cfg,) + mc.layers[layer + 1:]
                scores[k] += fisher_score(g, output(cfg, model.input_format(swapped, layer)) - y_ref)
        t_probes += time.perf_counter() - t1
        del act
    steps.close()
    deltas = [scores[k] - base_scores[layer] for k, (layer, _) in enumerate(probes)]
    return FisherProfile(scores=scores, base=base_scores, deltas=deltas,
                         seconds_backward=t_backward, seconds_probes=t_probes)
