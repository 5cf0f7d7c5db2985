"""Accuracy of a config against the fp32 reference: tt-metal's teacher-forced Top-1 / Top-5 method
(docs/NUMERICS.md), plus KL divergence and perplexity.

Method
------
Reference: the model's own weights run by `transformers` in fp32 (independent code: HF directories
in their ORIGINAL layout, e.g. Phi-3's fused qkv_proj / gate_up_proj; GGUF models rebuilt as
LlamaForCausalLM / Qwen2ForCausalLM from the spec and the loader's dequantized weights), streamed
one decoder layer at a time (`engine.models.reference`: the same modules and values as the whole model, in
the memory of one layer), teacher-forced over the first 1024 tokens of the evaluation
text (`engine.accuracy.text`). Its prediction at position p is the distribution of token p+1.

Trial (`Evaluator.evaluate`): prefill tokens 0..P-1 with the prefill numerics, then D
teacher-forced decode steps with the decode numerics in ONE batched pass feeding tokens
P..P+D-1. Every token of the window is known, so the window runs layer by layer
(`Model.run_window`): decoder layer L takes its prefill rows, then its decode rows against its own
KV cache, before layer L+1 is read, bit for bit what a model-major prefill + `decode_batched`
computes (`Evaluator.run_two_pass`). Models whose quantized weights exceed the memory budget
(`streams`) read each layer's weights from the checkpoint and release them after the layer, with
the quantized weights kept in a disk cache (`engine.models.weight_cache`); the LM head is read and
multiplied in vocabulary chunks, so peak memory holds one layer, one head chunk and the window. The decode logits at position p (p = P..P+D-1)
are scored against the reference's prediction at p. Default P = 512, D = 511: positions
512..1022, every token of the 1024 used. The prefill's own last prediction (position P-1) is
checked for NaN/Inf but not scored (tt-metal scores the decode steps).

Metrics over the D scored positions:
- top1: % of positions where the trial argmax equals the reference argmax;
  top5: % where the trial argmax is inside the reference top-5 (agreement with the reference
  model, not with the text); 95% Wilson score intervals for both (`wilson_interval`).
- kld: mean KL(reference || trial) in nats, over the full vocabulary.
- ppl / ref_ppl: perplexity of the true next tokens under the trial / the reference.
Any NaN or Inf in the trial's logits raises `NonFiniteLogits` (never a number).

Per-token record and llama.cpp statistics: every trial also returns an
`engine.accuracy.token_record.TokenRecord` (Top-1 / Top-5 hit, KLD, the trial's probability of the
reference argmax and delta-p per scored position) and `engine.accuracy.stats.kld_stats` of it (mean KLD
with its standard error, percentiles, RMS delta-p, same-top-p), as `llama-perplexity
--kl-divergence` prints them.

Windows (`windows = N`): window w is tokens w*L .. (w+1)*L-1 of the evaluation text
(L = reference_length(P, D) = 1024 by default), disjoint and consecutive; a tokenizer that adds
a BOS gets it as the first token of every window (replacing the text token there, as
llama-perplexity does per chunk), so every window starts like window 0. Each window is prefilled
and decoded from scratch and scored against its own cached fp32 reference; the metrics are over
all N*D positions and `top1_windows` gives each window's Top-1. Window 0 is exactly the
single-window tt-metal method, so 1-window figures compare with the seed.

Reference cache (what is stored and why)
----------------------------------------
One safetensors file per (model fingerprint: weights and config, text hash, reference length, P, D, window) under
`<cache>/reference/` (`$TTSWEEP_CACHE` or ~/.cache/ttsweep; never pickle):
  tokens       int32 [L]            the evaluation tokens (L = max(1024, P + D + 1))
  top5         int32 [L-1, 5]       reference top-5 next-token ids at every position, best first
  target_logp  fp32  [L-1]          reference log-prob of the true next token (ref perplexity)
  logp         fp16  [D, vocab]     reference log-probs at the scored positions P..P+D-1
KL(ref || trial) = sum_v p(v) (log p(v) - log q(v)) needs the reference's whole distribution at
each scored position. A top-k + log-sum-exp summary is not enough: on SmolLM2-135M the mass
outside the reference top-256 averages ~8% (up to 50% at uncertain positions) and a
bucketed top-256 KL reads ~10% low. fp16 log-probs are exact to ~1e-5 relative in the KL
(measured: 0.643186 vs 0.643189 nats) at 2 bytes per entry (50 MB for SmolLM2 at D = 511),
so the full distribution is stored, only at the scored positions.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.accuracy.stats import kld_stats
from engine.accuracy.text import text_sha256, text_tokens
from engine.accuracy.token_record import TokenRecord
from engine.models import loaders
from engine.models.reference import hf_config_from_spec, reference_logits, reference_model  # noqa: F401 - this module's API
from engine.models.spec import ModelSpec
from engine.vocab.config import Config, ModelConfig

REF_TOKENS = 1024  # tokens the reference runs over (tt-metal's method)
DEFAULT_PREFILL = 512
DEFAULT_DECODE = 511
REF_FORMAT = "2"  # bump when the cache file layout changes
Z95 = 1.959963984540054  # two-sided 95% normal quantile


class NonFiniteLogits(RuntimeError):
    """The trial produced NaN or Inf logits; the message says where and how many."""


# --- statistics ----------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError("a Wilson interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def check_finite(logits: torch.Tensor, what: str, first_position: int) -> None:
    """Raise NonFiniteLogits naming the positions and counts of NaN / Inf values."""
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return
    rows = bad.reshape(logits.shape[0], -1).any(dim=-1).nonzero().flatten().tolist()
    nan = int(torch.isnan(logits).sum())
    inf = int(bad.sum()) - nan
    first = first_position + rows[0]
    raise NonFiniteLogits(
        f"non-finite logits in {what}: {len(rows)} of {logits.shape[0]} positions "
        f"(first at position {first}); {nan} NaN and {inf} Inf values in all"
    )


def kl_divergence(ref_logp: torch.Tensor, trial_logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || trial) per row from log-probs [N, V] (computed in fp32; 0 * log 0 = 0).

    The reference row is renormalised first (its stored fp16 log-probs sum to 1 only to ~1e-3),
    which leaves the rounding error second order: ~1e-6 nats for an identical trial."""
    p_log = ref_logp.float()
    p_log = p_log - torch.logsumexp(p_log, dim=-1, keepdim=True)
    p = p_log.exp()
    diff = p_log - trial_logp.float()
    return torch.where(p > 0, p * diff, torch.zeros((), dtype=p.dtype)).sum(-1).clamp_min(0.0)  # >= 0 (rounding)


# --- reproducibility across CPUs -----------------------------------------------------------------
FP32_U = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)
MIN_SIMD_LANES = 8  # ATen's Vectorized<float> holds >= 8 floats on every build (AVX2, NEON pairs, the
#                     scalar "default" capability; AVX-512 holds 16)
OTHER_ROUNDINGS = 1000  # allowance, in units of FP32_U, for every rounding but the normaliser's sum


def vocab_sum_error(vocab: int) -> float:
    """Bound on the relative error of an fp32 sum of `vocab` positive terms accumulated in at least
    MIN_SIMD_LANES lanes (each lane adds vocab / lanes terms one after another, then the lanes add
    pairwise): (ceil(V / L) - 1 + log2 L) * u (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 4.2; each partial sum is a sum of positive terms)."""
    lanes = MIN_SIMD_LANES
    return (math.ceil(vocab / lanes) - 1 + math.log2(lanes)) * FP32_U


def cross_cpu_tolerance(vocab: int) -> float:
    """How far two CPUs may disagree on ln(ref_ppl) or on a mean KLD (nats), both computed in fp32.

    The figures that depend on summation order are means over positions of log-softmax values.
    Measured (docs/NUMERICS.md, "Reproducibility across CPUs"): the engine's logits and the
    reference's token and top-5 ids are bit-identical across ATen's CPU kernels; what moves is
    the log-softmax normaliser log(sum_v exp(z_v - max)), an fp32 sum of V positive terms whose
    order depends on the kernel's vector width. Its relative error eps = vocab_sum_error(V) is an
    absolute error eps of every log q_v of a row (all with the same sign), hence of each NLL
    and of each row's sum_v p_v log q_v (sum p = 1). Everything else (exp, log and subtraction
    roundings, ATen's cascade sums in the dot products, the forward pass's reordered matmuls,
    which move the logits ~20 u and the mean NLL ~1e-7 by measurement) is covered by
    OTHER_ROUNDINGS u. Each CPU's figure is within eps + OTHER_ROUNDINGS u of the exact value,
    so two CPUs' figures are within twice that: for SmolLM2 (V = 49152) 8.5e-4, against the
    8.3e-6 (ln ppl) and 7.7e-6 nats (KLD) measured between AVX2 and AVX-512 kernels."""
    return 2.0 * (vocab_sum_error(vocab) + OTHER_ROUNDINGS * FP32_U)


# --- the reference -------------------------------------------------------------------------------
@dataclass
class Reference:
    """The fp32 reference of one model over the evaluation text (see the module docstring)."""

    tokens: np.ndarray  # int32 [L]
    top5: np.ndarray  # int32 [L-1, 5]
    target_logp: np.ndarray  # fp32 [L-1]
    logp: np.ndarray  # fp16 [D, vocab] at positions prefill..prefill+D-1
    prefill: int
    decode: int
    path: Path | None = None
    window: int = 0

    @property
    def scored(self) -> slice:
        return slice(self.prefill, self.prefill + self.decode)

    def prepared(self) -> dict[str, torch.Tensor]:
        """Per-trial-invariant scoring tensors, computed once: the renormalised reference
        probabilities p [D, vocab] (fp32), sum_v p log p per row, top-5
        ids, the true next tokens and the reference NLL at the scored positions."""
        if getattr(self, "_prepared", None) is None:
            logp = torch.from_numpy(self.logp).float()
            logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
            p = logp.exp()
            s = self.scored
            self._prepared = {
                "p": p,
                "neg_entropy": torch.linalg.vecdot(p, logp).double(),  # same reduction as score()'s cross term
                "top5": torch.from_numpy(self.top5[s].astype(np.int64)),
                "targets": torch.from_numpy(self.tokens[s.start + 1:s.stop + 1].astype(np.int64)),
                "ref_nll": -torch.from_numpy(self.target_logp[s]).double(),
            }
        return self._prepared


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:48] or "model"


def reference_path(loaded: loaders.LoadedModel, prefill: int, decode: int, cache: Path, window: int = 0) -> Path:
    length = reference_length(prefill, decode)
    w = f"-W{window}" if window else ""  # window 0 keeps the single-window file name
    return cache / "reference" / (
        f"{_slug(loaded.spec.name)}-{loaded.fingerprint}-{text_sha256()[:12]}-L{length}-P{prefill}-D{decode}{w}.safetensors"
    )


def eval_key(loaded: loaders.LoadedModel, prefill: int, decode: int) -> str:
    """What a scored position is: model, weights fingerprint, text, prefill and decode (records of
    equal keys score the same tokens window by window)."""
    return f"{loaded.spec.name}/{loaded.fingerprint}/{text_sha256()[:12]}/P{prefill}/D{decode}"


def window_tokens(tokenizer, length: int, window: int) -> list[int]:
    """Tokens of window `window`: text tokens window*length .. (window+1)*length-1, with the
    tokenizer's BOS as the first token when it adds one (window 0 = `text_tokens(tok, length)`)."""
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    try:
        stream = text_tokens(tokenizer, (window + 1) * length)
    except ValueError as exc:
        raise ValueError(f"window {window} of {length} tokens does not fit in the evaluation text ({exc}); "
                         "use fewer windows") from exc
    out = stream[window * length:]
    bos = getattr(tokenizer, "bos_token_id", None)
    if window and bos is not None and stream[0] == bos:
        out[0] = bos
    return out


def reference_length(prefill: int, decode: int) -> int:
    """Tokens of the reference's one forward: max(1024, P+D+1) (1024 or more: reusable)."""
    return max(REF_TOKENS, prefill + decode + 1)


def compute_reference(loaded: loaders.LoadedModel, prefill: int, decode: int, window: int = 0) -> Reference:
    """Run the fp32 transformers reference over window `window` (reference_length(P, D) tokens)."""
    length = reference_length(prefill, decode)
    tok = loaded.tokenizer
    if tok is None:
        raise FileNotFoundError(f"model {loaded.spec.name!r} ({loaded.source}) has no tokenizer files; cannot tokenize the text: "
                                "put the checkpoint's tokenizer.json and tokenizer_config.json next to its config.json")
    tokens = window_tokens(tok, length, window)
    if max(tokens) >= loaded.spec.vocab:
        raise ValueError(f"tokenizer produced id {max(tokens)} >= vocab {loaded.spec.vocab}")
    logits = reference_logits(loaded, tokens)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    del logits
    check_finite(logp, "the fp32 reference", 0)
    targets = torch.as_tensor(tokens[1:], dtype=torch.long)
    return Reference(
        tokens=np.asarray(tokens, dtype=np.int32),
        top5=logp.topk(5, dim=-1).indices.to(torch.int32).numpy(),
        target_logp=logp.gather(1, targets[:, None])[:, 0].numpy().astype(np.float32),
        logp=logp[prefill:prefill + decode].to(torch.float16).numpy(),
        prefill=prefill, decode=decode, window=window,
    )


def _meta(loaded: loaders.LoadedModel, prefill: int, decode: int, window: int = 0) -> dict[str, str]:
    meta = {"format": REF_FORMAT, "model": loaded.spec.name, "fingerprint": loaded.fingerprint,
            "text_sha256": text_sha256(), "length": str(reference_length(prefill, decode)),
            "prefill": str(prefill), "decode": str(decode), "vocab": str(loaded.spec.vocab),
            "special_tokens": "none"}  # the text is encoded without BOS (engine.accuracy.text)
    if window:  # window 0 keeps the single-window metadata: its cache files stay valid
        meta["window"] = str(window)
    return meta


def save_reference(ref: Reference, path: Path, meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ref-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({"tokens": ref.tokens, "top5": ref.top5, "target_logp": ref.target_logp, "logp": ref.logp}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    ref.path = path


def read_reference(path: Path, meta: dict[str, str]) -> Reference | None:
    """The cached reference at `path`, or None when absent, unreadable or for other inputs."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}) != meta:
                return None
            arrays = {k: f.get_tensor(k) for k in ("tokens", "top5", "target_logp", "logp")}
    except Exception:  # truncated or foreign file: recompute
        return None
    p, d, length, vocab = int(meta["prefill"]), int(meta["decode"]), int(meta["length"]), int(meta["vocab"])
    if (arrays["tokens"].shape != (length,) or arrays["top5"].shape != (length - 1, 5)
            or arrays["target_logp"].shape != (length - 1,) or arrays["logp"].shape != (d, vocab)):
        return None
    return Reference(arrays["tokens"], arrays["top5"], arrays["target_logp"], arrays["logp"], p, d, path,
                     int(meta.get("window", 0)))


def load_reference(loaded: loaders.LoadedModel, prefill: int, decode: int, cache: str | os.PathLike | None = None,
                   window: int = 0) -> Reference:
    """The cached reference of one window, computed (and cached) on first use."""
    path = reference_path(loaded, prefill, decode, loaders.cache_dir(cache), window)
    meta = _meta(loaded, prefill, decode, window)
    ref = read_reference(path, meta)
    if ref is None:
        ref = compute_reference(loaded, prefill, decode, window)
        save_reference(ref, path, meta)
    return ref


# --- scoring -------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    top1_ci: tuple[float, float]  # 95% Wilson, percent
    top5_ci: tuple[float, float]
    kld: float  # mean KL(reference || trial), nats
    ppl: float  # perplexity of the true next tokens under the trial
    ref_ppl: float  # ... under the fp32 reference
    tokens: int  # scored decode positions
    seconds: float  # trial wall time (prefill + decode + scoring)
    config: str = ""  # canonical ModelConfig string
    model: str = ""
    device: str = "N150"  # the system whose numerics were emulated (tensor-parallel rounding)
    lm_head: tuple[str, str] = ("bfp8", "hifi2fp16")  # model-level: LM head weight format, fidelity
    windows: int = 1  # disjoint windows scored (tokens = windows * decode)
    top1_windows: list[float] = field(default_factory=list)  # Top-1 (%) of each window
    stats: dict[str, float] = field(default_factory=dict)  # engine.accuracy.stats.kld_stats (llama.cpp style)
    record: TokenRecord | None = field(default=None, repr=False)  # per-token record

    @property
    def top1_window_sd(self) -> float:
        """Sample standard deviation of the per-window Top-1 (NaN with one window)."""
        return float(np.std(self.top1_windows, ddof=1)) if len(self.top1_windows) > 1 else math.nan

    def to_dict(self) -> dict:
        """JSON-able: every field but the record, with the KLD statistics at the top level."""
        d = asdict(self)
        d.pop("record", None)
        d |= d.pop("stats")
        d["top1_ci"], d["top5_ci"] = list(self.top1_ci), list(self.top5_ci)
        d["lm_head"] = list(self.lm_head)
        sd = self.top1_window_sd
        d["top1_window_sd"] = None if math.isnan(sd) else sd
        return d


def score_tokens(logits: torch.Tensor, ref: Reference, argmax_ties: str = "first") -> dict[str, torch.Tensor]:
    """Per-position metrics of decode logits [D, vocab] (positions ref.prefill..) against the
    reference: top1 / top5 (bool), kld, p_top (trial probability of the reference argmax), dp
    (trial minus reference probability of the true next token), nll and ref_nll (float64).

    A handful of passes over the logits (row sums as the NaN/Inf screen, log-softmax, argmax, one
    row-wise dot product); everything about the reference is precomputed (`Reference.prepared`):
    KL(p || q) = sum p log p - sum p log q. `argmax_ties`: which of equal maximal logits is the
    trial's argmax, the lowest vocabulary index ("first", torch's) or the highest ("last": an
    assumption switch, engine.vocab.assumptions)."""
    d = ref.decode
    if tuple(logits.shape) != (d, ref.logp.shape[1]):
        raise ValueError(f"decode logits have shape {tuple(logits.shape)}, expected ({d}, {ref.logp.shape[1]})")
    logits = logits.float().contiguous()
    if not bool(torch.isfinite(logits.sum(-1)).all()):  # NaN/Inf anywhere makes its row sum non-finite
        check_finite(logits, "decode", ref.prefill)
    pre = ref.prepared()
    logq = torch.log_softmax(logits, dim=-1)
    argmax = logits.argmax(dim=-1) if argmax_ties == "first" else logits.shape[1] - 1 - logits.flip(-1).argmax(dim=-1)
    cross = torch.linalg.vecdot(pre["p"], logq).double()  # sum_v p log q (fp32 einsum/bmm is too coarse here)
    nll = -logq.gather(1, pre["targets"][:, None])[:, 0].double()
    return dict(
        top1=argmax == pre["top5"][:, 0],
        top5=(argmax[:, None] == pre["top5"]).any(dim=-1),
        kld=(pre["neg_entropy"] - cross).clamp_min(0.0),
        p_top=logq.gather(1, pre["top5"][:, :1])[:, 0].double().exp(),
        dp=torch.exp(-nll) - torch.exp(-pre["ref_nll"]),
        nll=nll, ref_nll=pre["ref_nll"],
    )


def summarize(per: dict[str, torch.Tensor]) -> dict:
    """Top-1 / Top-5 (%) with 95% Wilson intervals, mean KLD and perplexities of `score_tokens` output."""
    n = int(per["top1"].numel())
    hit1, hit5 = int(per["top1"].sum()), int(per["top5"].sum())
    ci1, ci5 = wilson_interval(hit1, n), wilson_interval(hit5, n)
    return dict(
        top1=100.0 * hit1 / n, top5=100.0 * hit5 / n,
        top1_ci=(100.0 * ci1[0], 100.0 * ci1[1]), top5_ci=(100.0 * ci5[0], 100.0 * ci5[1]),
        kld=float(per["kld"].mean()), ppl=float(torch.exp(per["nll"].mean())),
        ref_ppl=float(torch.exp(per["ref_nll"].mean())), tokens=n,
    )


def score(logits: torch.Tensor, ref: Reference) -> dict:
    """Metrics of decode logits [D, vocab] against the reference (one window; `summarize`)."""
    return summarize(score_tokens(logits, ref))


def token_record(parts: list[dict[str, torch.Tensor]], key: str = "") -> TokenRecord:
    """The per-token record of `score_tokens` outputs, one per window, in window order."""
    return TokenRecord.concat([
        TokenRecord(*(p[k].cpu().numpy() for k in ("top1", "top5", "kld", "p_top", "dp")), windows=1, eval_key=key)
        for p in parts
    ])


# --- the evaluator -------------------------------------------------------------------------------
def device_layout(device: str) -> tuple[int, str]:
    """(tensor-parallel chips, topology) of one replica of `device` as tt_transformers lays a model
    out on it; accuracy depends on it (wo / w2 split along K). TG's 2-D mesh is not emulated."""
    from engine.vocab.devices import device_for, emulated_devices

    rep = device_for(device).replica(1)
    why = rep.device.chip.numerics or ("its 2-D Galaxy mesh with bfp8 collectives is not modelled" if rep.layout == "mesh2d" else "")
    if why:
        ok = emulated_devices()
        raise ValueError(f"accuracy on {rep.device.name} is not emulated: {why}; evaluate on {', '.join(ok[:-1])} or {ok[-1]}")
    return rep.tp, rep.layout


def numerics_layout(spec: ModelSpec, device: str) -> tuple[int, int]:
    """(tensor-parallel chips, chips wo is split over) of `device` for this model: what the device
    adds to a config's numerics (sweep.equivalence's `layout`). ValueError where not emulated."""
    from engine.models.programs import wo_fused

    tp, topology = device_layout(device)
    return tp, 1 if wo_fused(spec, tp, topology) else tp


def memory_budget() -> int:
    """Bytes the evaluator may hold as quantized weights (TTSWEEP_MEMORY_GB, default 4)."""
    raw = os.environ.get("TTSWEEP_MEMORY_GB", "").strip()
    try:
        gb = float(raw) if raw else 4.0
    except ValueError:
        raise ValueError(f"TTSWEEP_MEMORY_GB={raw!r} is not a number of gigabytes (e.g. 4)") from None
    return int(gb * 2**30)


def streams(loaded: loaders.LoadedModel) -> bool:
    """Whether trials stream the weights layer by layer from their store (True) or keep every
    quantized weight in memory across trials (False: small models). Kept weights take up to three
    bf16 copies (one per format a study uses) of the model: 1.5x its fp32 bytes."""
    w = loaded.weights
    return sum(w.nbytes(k) for k in w) * 3 // 2 > memory_budget()


class Evaluator:
    """Loads a model, its tokens and its fp32 reference once; `evaluate(config)` runs one trial.

    One `engine.models.model.Model` is reused across trials, so its quantized-weight cache is too.
    `device` (default N150) decides the tensor-parallel layout whose rounding is emulated; `lm_head`
    (optional) overrides the model-level LM head (default bfp8 + hifi2fp16 as tt/lm_head.py);
    `silu` the SFPU SiLU (`sfpu-piecewise`, the seed era's, or `exact`; default the profile's);
    `profile` the tt-metal release whose rules apply (engine.vocab.profiles: seed, current); `assumptions` switches of
    engine.vocab.assumptions away from their defaults (the assumption band); `torch_device` where the
    engine runs (cpu, cuda:0). `windows` disjoint windows are scored (see the module docstring);
    their references are computed once and cached like window 0's.
    """

    def __init__(self, model_name: str, prefill: int = DEFAULT_PREFILL, decode: int = DEFAULT_DECODE,
                 cache_dir: str | os.PathLike | None = None, *, lm_head: tuple[str, str] | None = None,
                 device: str = "N150", silu: str | None = None, torch_device: str | None = None,
                 windows: int = 1, stream: bool | None = None, assumptions: dict[str, str] | None = None,
                 profile: str | None = None):
        if prefill < 1 or decode < 1:
            raise ValueError(f"prefill and decode must be >= 1 (got {prefill}, {decode})")
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
            raise ValueError(f"windows must be an integer >= 1 (got {windows!r})")
        self.model_name = str(model_name)
        self.prefill, self.decode = int(prefill), int(decode)
        self.loaded = loaders.load(model_name, cache=cache_dir)
        self.loaded.require_tokenizer()  # before anything is written to the cache
        self.cache_dir = loaders.cache_dir(cache_dir)
        self.spec: ModelSpec = self.loaded.spec
        if prefill + decode > self.spec.max_seq:
            raise ValueError(f"prefill + decode = {prefill + decode} exceeds {self.spec.name}'s context of {self.spec.max_seq}")
        from engine.models.programs import check_tp
        from engine.vocab.devices import normalise_device

        self.device = normalise_device(device)
        self.tp, self.topology = device_layout(self.device)
        check_tp(self.spec, self.tp)  # tt_transformers' own layout asserts, before any trial
        self.windows = windows
        from engine.progress import bar

        self.references = [load_reference(self.loaded, self.prefill, self.decode, self.cache_dir, w)
                           for w in bar(range(windows), desc=f"fp32 reference of {self.spec.name}", unit="window")]
        for ref in self.references:
            ref.prepared()
        self.reference = self.references[0]
        self.window_tokens = [torch.from_numpy(r.tokens[: prefill + decode].astype(np.int64)) for r in self.references]
        self.tokens = self.window_tokens[0]
        self._model = None
        self._anchors: list | None = None
        from engine.vocab import profiles

        self.profile = profiles.profile(profile).name  # the tt-metal release whose rules apply
        self.set_assumptions(assumptions)
        self._lm_head = tuple(lm_head) if lm_head else None
        self._silu = silu
        self.torch_device = torch_device
        self.stream = streams(self.loaded) if stream is None else bool(stream)
        self.weight_cache = None
        if self.stream and self.loaded.kind == "hf":  # a checkpoint on disk: quantize each weight once per study
            from engine.models.weight_cache import WeightCache, limit_bytes

            if limit_bytes() > 0:
                self.weight_cache = WeightCache(self.cache_dir, self.loaded.fingerprint)

    @property
    def model(self):
        """The engine Model (built on first use, then reused)."""
        if self._model is None:
            from engine.models.model import Model

            kwargs = {"lm_head": self._lm_head} if self._lm_head else {}
            if self._silu:
                kwargs["silu"] = self._silu
            # longrope picks its factors from the length of the reference's one forward, as transformers does
            ctx = reference_length(self.prefill, self.decode)
            self._model = Model(self.spec, self.loaded.weights, rope_context=ctx, tp=self.tp, topology=self.topology,
                                torch_device=self.torch_device, keep_weights=not self.stream,
                                weight_cache=self.weight_cache, assumptions=self.assumptions, profile=self.profile,
                                **kwargs)
        return self._model

    def set_assumptions(self, assumptions: dict[str, str] | None) -> None:
        """Run later trials under these switches of engine.vocab.assumptions (None: the defaults);
        the evaluation key carries the changed ones, so their records never pair with others'."""
        from engine.vocab import assumptions as assumptions_table
        from engine.vocab import profiles

        self.assumptions = profiles.profile(self.profile).assumptions(assumptions)
        self.eval_key = (eval_key(self.loaded, self.prefill, self.decode) + assumptions_table.key(self.assumptions)
                         + ("" if self.profile == profiles.DEFAULT else f"+tt:{self.profile}"))
        self._anchors = None  # cached layer inputs were computed under the old switches
        if self._model is not None:
            self._model.set_assumptions(self.assumptions)

    @property
    def layout(self) -> tuple[int, int]:
        """(tensor-parallel chips, chips wo is split over): what the device adds to a config's numerics."""
        return numerics_layout(self.spec, self.device)

    def model_config(self, config: ModelConfig | Config | str) -> ModelConfig:
        """A ModelConfig for this model from a ModelConfig, a Config (uniform) or a preset /
        config string (resolved for this model's name; uniform unless it has a decoders part)."""
        n = self.spec.n_layers
        if isinstance(config, ModelConfig):
            if config.n_layers != n:
                raise ValueError(f"config has {config.n_layers} layers, {self.spec.name} has {n}")
            return config
        if isinstance(config, Config):
            return ModelConfig.uniform(config, n)
        if isinstance(config, str):
            return ModelConfig.parse(config, n, self.spec.name)
        raise TypeError(f"config must be a ModelConfig, Config or string, not {type(config).__name__}")

    def run(self, config: ModelConfig | Config | str, window: int = 0) -> torch.Tensor:
        """One window, layer by layer (`Model.run_window`: each decoder layer's prefill rows, then its
        batched teacher-forced decode rows, before the next layer is read); the decode logits
        [D, vocab]. With an anchor (`set_anchor`) the run starts at the first layer whose config
        differs from the anchor's, from the anchor's cached input of that layer."""
        mc = self.model_config(config)
        p, d = self.prefill, self.decode
        resume = self._anchors[window] if self._anchors else None
        with torch.inference_mode():
            last, logits, _ = self.model.run_window(self.window_tokens[window], p, mc, capacity=p + d, resume=resume)
            check_finite(last, "prefill", p - 1)
        return logits

    def run_two_pass(self, config: ModelConfig | Config | str, window: int = 0) -> torch.Tensor:
        """The same window model-major: one prefill through every layer, then one batched decode
        pass through every layer (bit-identical to `run`; it holds every layer's KV cache)."""
        mc = self.model_config(config)
        p, d = self.prefill, self.decode
        tokens = self.window_tokens[window]
        with torch.inference_mode():
            last, cache = self.model.prefill(tokens[:p], mc, logits_for="last", capacity=p + d)
            check_finite(last, "prefill", p - 1)
            return self.model.decode_batched(tokens[p:p + d], cache, mc)

    def set_anchor(self, config: ModelConfig | Config | str | None) -> None:
        """Keep every layer's input under `config` (one run per window): later trials that agree with
        it on layers 0..L-1 start at layer L (a sensitivity probe recomputes from its layer on).
        None drops the anchor."""
        self._anchors = None
        if config is None:
            return
        mc = self.model_config(config)
        p, d = self.prefill, self.decode
        anchors = []
        with torch.inference_mode():
            for tokens in self.window_tokens:
                anchors.append(self.model.run_window(tokens, p, mc, capacity=p + d, keep_inputs=True)[2])
        self._anchors = anchors

    def evaluate(self, config: ModelConfig | Config | str) -> EvalResult:
        """One trial over every window: metrics over all scored positions, per-window Top-1,
        llama.cpp-style KLD statistics and the per-token record."""
        from engine.progress import bar

        mc = self.model_config(config)
        t0 = time.perf_counter()
        parts = []
        for w, ref in enumerate(bar(self.references, desc="evaluating", unit="window")):
            logits = self.run(mc, w)
            with torch.inference_mode():
                parts.append(score_tokens(logits.cpu(), ref, self.assumptions["argmax_ties"]))
            del logits
        per = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        rec = token_record(parts, self.eval_key)
        m = self.model
        return EvalResult(**summarize(per), seconds=time.perf_counter() - t0, config=str(mc), model=self.spec.name,
                          device=self.device, lm_head=(m.lm_head_format, m.lm_head_setting.value),
                          windows=self.windows, top1_windows=rec.top1_by_window(), record=rec,
                          stats=kld_stats(kld=per["kld"].numpy(), dp=per["dp"].numpy(), top1=per["top1"].numpy()))
