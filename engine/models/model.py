"""A compact Llama-family decoder whose every op applies a ModelConfig's Wormhole numerics.

Read top to bottom: numerics helpers, RoPE, the KV cache, then `Model` (weights, one decoder
layer, attention, prefill / decode). Covers Llama 2/3 (incl. Llama 3 rope scaling), Mistral,
SmolLM2, Qwen2 (q/k/v biases) and Phi-3 / Phi-3.5 (the loader splits its fused weights; longrope
with its attention factor, long factors once the sequence passes the pretraining length):
RMSNorm, RoPE in Hugging Face's rotate_half convention, grouped-query attention (with a sliding
window where the config has one), SwiGLU MLP, tied or untied head.
Batch 1; tokens are 1-D LongTensors.

Numerics of one decoder layer i, from its Config c = cfg.layers[i] (docs/NUMERICS.md)
------------------------------------------------------------------------------------------------
Weights (host rounding, quantized once per (tensor, format) and cached in the model, held as
torch.bfloat16, which represents every bf16/bfp8/bfp4 value exactly): stored as tt-metal stores them, [in_features, out_features], so bfp blocks of 16 run along OUTPUT features
(quantize(W.T) for a Hugging Face [out, in] W).
  wqkv    q, k and v fused into one [hidden, (n_heads + 2 n_kv_heads) * head_dim] matrix like
          tt-metal's wqkv and quantized as one tensor; with head_dim a multiple of 16 (every
          supported model) no block straddles the q/k/v (or head) boundaries.
  wo      output projection.
  ff1_3   gate (w1) and up (w3), each quantized on its own, then fused side by side into one
          matrix so the two linears run as one matmul (same result as two).
  ff2     down (w2).
  kv_cache  K and V as written to the cache (device rounding, blocks of 16 along head_dim of
          one token); attention reads these values in prefill too (tt-metal's prefill SDPA
          consumes the typecast K/V that it writes to the cache).
Linears and attention matmuls go through `fidelity.matmul(activation, weight, setting)`:
  li_qkv_prefill / li_qkv_decode    the qkv linear          li_ff1_3   w1 and w3 (both modes)
  li_o_prefill / li_o_decode        the wo linear           li_ff2     w2 (both modes)
  sdpa_prefill / sdpa_decode        Q @ K^T (Q = activation/SrcB, K^T = weight/SrcA side), the
          softmax (exp exact by default, see below) and P @ V (V = weight side).
Output dtypes: every op's output and activation operand dtype is a row of engine.vocab.ops (THE
op table; `mixed`: qkv, w1, w3, w2 outputs bf16; SiLU(w1)*w3 bfp8; Q (after RoPE) and the wo
output bfp8 in prefill, bf16 in decode; a forced bf16 / bfp8 activation replaces the forced
entries; device rounding for bfp). Activation fp32 is FULL-PRECISION MODE (the rule): a layer
whose activation is fp32 rounds nothing that its config does not govern; its governed weights,
K/V cache and fidelities still apply.
Ungoverned ops: RMSNorm in fp32, output in the layer input's dtype (or the forced activation);
RoPE as rotary_embedding_llama computes it, each product and the sum rounded to bf16, with bf16
cos/sin tables; residual adds in fp32 rounded to the residual's dtype. The SiLU is the mul's fused
pre-activation: SiLU(w1 output) is packed in w1's output dtype, then the product is rounded (two
roundings, `silu` picks the SFPU's piecewise or x*sigmoid). Norm weights and q/k/v biases are
held in bf16 (fp32 in full-precision mode); a bias is added AFTER the qkv output is rounded, and
the sum rounded again (attention.py). SDPA is flash attention as sdpa_program_factory /
sdpa_decode run it: K chunks (64 / 256 in prefill, 256 in decode), a running max, scores, P,
the row sum and O held in bf16 between steps, exact exp (tt_transformers runs SDPA's exp in exact
mode whatever the setting's approx flag; `Model(..., sdpa_exp_approx=True)` uses the SFPU's
approximate exp and reciprocal instead, to study that choice), out = O * recip(l) in Q's dtype;
whole-row fp32 softmax in full-precision mode.

Model-level ops (embedding lookup, final norm, LM head) run in full precision iff EVERY layer is in
full-precision mode (so `engine.vocab.config.REFERENCE` is plain fp32 end to end and matches the
transformers fp32 model). Otherwise: embedding table bf16, final norm output bf16, LM head weights
in `lm_head[0]` (host rounding) with fidelity `lm_head[1]`, logits rounded to `logits_format`
(tt-metal's lm_head writes bfp8_b; "fp32" keeps the matmul's output).

Row layout and exact decode equivalence: decode pads its S query rows up to a multiple of 32 (one
tile of rows, as the hardware does) and attends over the cache's whole fixed-capacity buffer
(masked), so every matmul and reduction sees the same shapes whether S tokens come in one
`decode_batched` call or one per `decode_step`; BLAS results per row then agree bit for bit. The
cache grows (doubling) past its capacity, which changes the key length for later steps.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.models import programs
from engine.models.spec import ModelSpec
from engine.models.store import CHUNK_BYTES, DictStore, WeightStore, give_back_memory, vocab_chunks
from engine.numerics import fidelity, formats
from engine.vocab import assumptions as assumptions_table
from engine.vocab import ops, profiles
from engine.vocab.config import LM_HEAD, Config, ConfigError, FidelitySetting, ModelConfig, Precision, fidelity_of

ROWS = 32  # tile height: decode and LM-head activations are padded to a multiple of it
LM_HEAD_CHUNK_BYTES = CHUNK_BYTES  # the LM head is read, quantized and multiplied in vocabulary chunks of this many fp32 bytes
FULL = "fp32"  # the no-rounding format name
DEFAULT_SILU = profiles.profile(None).silu  # the default profile's (the seed era's SFPU SiLU)


# ------------------------------------------------------------------------------------------------
# Numerics helpers
# ------------------------------------------------------------------------------------------------
def rnd(x: torch.Tensor, fmt: str, pack: tuple[str, str] = ("device", "away")) -> torch.Tensor:
    """Round an activation to `fmt` as the device writes it (fp32: unchanged). `pack` = (rounding,
    gasket ties) of a block-format output: one rounding ("device", a typecast) by default; a
    compute op's output under the `bfp_pack = double` assumption: ("packer", ties)."""
    return x if fmt == FULL else formats.quantize(x, fmt, rounding=pack[0], gasket_ties=pack[1])


def mm(setting: FidelitySetting, x: torch.Tensor, w: torch.Tensor, k_block: int | None = None,
       out_fmt: str = "bf16", interm: str | None = None) -> torch.Tensor:
    """x [..., M, K] (activation, SrcB) @ w (weight, SrcA) under a config fidelity setting -> fp32
    (`exact` is fidelity's plain fp32 matmul)."""
    return fidelity.matmul(x, w, setting.kernel, k_block, out_fmt=out_fmt, interm=interm)


def sdpa_scale(head_dim: int, full: bool = False) -> float:
    """1/sqrt(head_dim) as the SDPA kernels take it: the fp32 value truncated to bf16
    (`scale_bf16 = scale_fp32 >> 16`); exact in full-precision mode."""
    scale = 1.0 / math.sqrt(head_dim)
    if full:
        return scale
    return float(torch.tensor(scale).view(torch.int32).bitwise_and(-65536).view(torch.float32))


def _out(c: Config, op: str, held: str = "bf16") -> str:
    """The dtype op `op` writes under layer config `c` (engine.vocab.ops: THE op table)."""
    return ops.out_dtype(op, None if c.activation is None else c.activation.value, held)


def _pad_rows(x: torch.Tensor, multiple: int = ROWS) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _full(c: Config) -> bool:
    """Full-precision mode (the module docstring's rule): the layer's activation is fp32."""
    return c.activation is Precision.FP32


def _out_format(c: Config) -> str:
    """The dtype a decoder layer's output is held in: the forced activation, else bf16."""
    return _out(c, "residual")


def _rope_format(c: Config) -> str:
    """RoPE's cos/sin tables are held in bf16, fp32 in full-precision mode."""
    return FULL if _full(c) else "bf16"


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: str,
              pack: tuple[str, str] = ("device", "away"), hifi2: bool = False) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w in fp32 (transformers' LlamaRMSNorm), rounded to `out`.
    `hifi2` (the current profile; full-precision mode never): as models/common/rmsnorm.py runs it,
    HiFi2 with an fp32 dest: x*x, the reduce's multiply by the bf16 scaler 1/N, x*rsqrt and *gamma
    each through the fidelity phases (fidelity.eltwise_mul), sums in fp32."""
    if not hifi2 or out == FULL:
        return rnd(F.rms_norm(x, (x.shape[-1],), w, eps), out, pack)
    scaler = torch.tensor(1.0 / x.shape[-1], device=x.device).to(torch.bfloat16).float()
    mean = fidelity.eltwise_mul(fidelity.eltwise_mul(x, x, "hifi2"), scaler, "hifi2").sum(-1, keepdim=True)
    y = fidelity.eltwise_mul(x, torch.rsqrt(mean + eps), "hifi2")
    return rnd(fidelity.eltwise_mul(y, w, "hifi2"), out, pack)


# ------------------------------------------------------------------------------------------------
# RoPE (Hugging Face rotate_half convention; inverse frequencies as transformers computes them)
# ------------------------------------------------------------------------------------------------
def rope_inv_freq(spec: ModelSpec, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] as transformers computes them for the spec's rope
    scaling; `long`: longrope's long factors (else its short ones)."""
    dim = spec.head_dim
    shape = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (spec.rope_theta ** shape)
    rs = spec.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":  # transformers' _compute_llama3_parameters
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv_l)
    if kind == "longrope":  # transformers' _compute_longrope_parameters
        ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32)
        if ext.shape != (dim // 2,):
            raise ValueError(f"longrope factors have {ext.numel()} values; head_dim {dim} needs {dim // 2}")
        return 1.0 / (ext * spec.rope_theta ** shape)
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3, longrope)")


def to_meta(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k projection rows (or bias) from Hugging Face's rotate-half order to Meta's interleaved-pair
    order (tt_transformers' convert_hf_to_meta / reverse_permute): within each head, row i of the first
    half and row i of the second half become rows 2i and 2i+1. The attention scores are unchanged
    (q and k are permuted alike); what changes is which values share a bfp block of 16."""
    rest = w.shape[1:]
    return w.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Per layer: kt [n_kv, head_dim, capacity] (K stored transposed, the matmul's weight side) and
    v [n_kv, capacity, head_dim], holding values already rounded to the layer's kv_cache format.
    Positions 0..length-1 are filled; the rest is zero."""

    kt: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int

    @property
    def capacity(self) -> int:
        return self.v[0].shape[1]

    def clone(self) -> "KVCache":
        return KVCache([t.clone() for t in self.kt], [t.clone() for t in self.v], self.length)

    def reserve(self, end: int) -> None:
        """Make room for positions < end (capacity doubles, rounded to 32)."""
        if end <= self.capacity:
            return
        cap = -(-max(end, 2 * self.capacity) // ROWS) * ROWS
        self.kt = [F.pad(t, (0, cap - t.shape[2])) for t in self.kt]
        self.v = [F.pad(t, (0, 0, 0, cap - t.shape[1])) for t in self.v]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
@dataclass
class LayerInputs:
    """Every decoder layer's input under one config, from a layer-streamed run: layer -> (prefill
    rows, decode rows, dtype). A config that agrees with it on layers 0..L-1 (and on whether every
    layer is in full-precision mode, which sets the embedding's dtype) starts at layer L."""

    layers: tuple[Config, ...]
    full: bool
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)

    def start_for(self, layers: tuple[Config, ...]) -> int:
        """The first layer `layers` must compute itself (0: nothing to reuse)."""
        if len(layers) != len(self.layers) or all(_full(c) for c in layers) != self.full:
            return 0
        n = 0
        while n < len(layers) and layers[n] == self.layers[n]:
            n += 1
        while n and n not in self.inputs:
            n -= 1
        return n


def _is_matrix(name: str) -> bool:
    """A stored weight matrix name ('L.wqkv', 'L.wo', 'L.w13', 'L.w2', 'lm_head', 'lm_head[a:b]')."""
    return name.startswith("lm_head") or name.partition(".")[2] in ("wqkv", "wo", "w13", "w2")


class _Prefetcher:
    """Loads decoder layer i+1's weights (read, quantize or read from the disk cache, move to the
    device) in a background thread while layer i computes, on a side CUDA stream when the model is
    on a GPU. `ready(i)` waits for layer i's. Only when `model.prefetch` is set (default: on
    CUDA); a weight is the same tensor whichever thread made it, so results do not change."""

    def __init__(self, model: "Model", layers: tuple[Config, ...]):
        self.model, self.layers = model, layers
        self.pool = self.future = None
        self.side = None

    def __enter__(self) -> "_Prefetcher":
        if self.model.prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="ttsweep-prefetch")
            if self.model.device.type == "cuda":
                self.side = torch.cuda.Stream(self.model.device)
        return self

    def _load(self, i: int) -> None:
        m = self.model
        with torch.inference_mode(), (torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()):
            for key in m.layer_weights(i, self.layers[i]).values():
                m.weight(*key)

    def ready(self, i: int) -> None:
        if self.pool is None:
            return
        if self.future is not None:
            self.future.result()  # layer i's weights (a loading error surfaces here)
            if self.side is not None:
                main = torch.cuda.current_stream(self.model.device)
                main.wait_stream(self.side)
                for key in self.model.layer_weights(i, self.layers[i]).values():
                    self.model.weight(*key).record_stream(main)  # freed only after the main stream's use
        if i + 1 < len(self.layers):
            self.future = self.pool.submit(self._load, i + 1)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            if self.future is not None:
                self.future.cancel()
                try:
                    self.future.result()
                except Exception:  # noqa: BLE001 - the run itself failed or finished; nothing to load
                    pass
            self.pool.shutdown(wait=True)


class _Reader:
    """`model.w[name]` on the model's torch device (what _make_weight reads)."""

    def __init__(self, model: "Model"):
        self.model = model

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.model._src(name)

    def __contains__(self, name: str) -> bool:
        return name in self.model.w


def _under_assumptions(method):
    """Run a Model entry point under its 16-bit dest narrowing rule (engine.vocab.assumptions
    `dest16_round`; process-wide while it runs: engine.numerics.fidelity.dest16_rounding)."""
    import functools

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        ties = self.assumptions["dest16_round"]
        if ties == assumptions_table.ASSUMPTIONS["dest16_round"].default:
            return method(self, *args, **kwargs)
        with fidelity.dest16_rounding(ties):
            return method(self, *args, **kwargs)

    return run


class Model:
    """A Llama-family decoder over canonical (Hugging Face-named, fp32) weights.

    `prefill(tokens, cfg)` -> (logits, cache); `decode_batched(tokens, cache, cfg)` feeds S tokens
    at positions cache.length.. (teacher forcing), bit-identical to S `decode_step` calls.
    `cfg` is a ModelConfig (one Config per layer) or a Config applied to every layer.
    """

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        lm_head: tuple[str, str] = LM_HEAD,
        logits_format: str = "bfp8",
        sdpa_exp_approx: bool = False,
        rope_context: int | None = None,
        tp: int = 1,
        topology: str = "line",
        silu: str | None = None,
        torch_device: str | torch.device | None = None,
        keep_weights: bool = True,
        weight_cache=None,
        prefetch: bool | None = None,
        assumptions: dict[str, str] | None = None,
        profile: str | None = None,
    ):
        if spec.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {spec.head_dim}")
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"n_heads {spec.n_heads} is not a multiple of n_kv_heads {spec.n_kv_heads}")
        programs.check_tp(spec, tp)
        self.profile = profiles.profile(profile)  # the tt-metal release whose rules apply (engine.vocab.profiles)
        self.set_assumptions(assumptions)
        self.spec = spec
        self.tp, self.topology = int(tp), topology
        self.wo_split = 1 if programs.wo_fused(spec, self.tp, topology) else self.tp  # wo split along K
        self._prog = {p: programs.blocks(spec, self.tp, p, topology) for p in (False, True)}
        self.sdpa_exp_approx = sdpa_exp_approx  # False: exact exp in SDPA, as tt_transformers runs it
        self.silu = fidelity.silu_fn(silu or self.profile.silu)
        self.lm_head_format, self.lm_head_setting = lm_head[0], fidelity_of(lm_head[1])
        formats.get_format(self.lm_head_format)
        self.logits_format = formats.get_format(logits_format).name
        self.device = torch.device(torch_device) if torch_device is not None else torch.device("cpu")
        # canonical fp32 weights, read on use (a WeightStore reads a checkpoint tensor by tensor)
        self.w: WeightStore = weights if isinstance(weights, WeightStore) else DictStore(
            {k: v.detach().to(torch.float32) for k, v in weights.items()})
        self.keep_weights = keep_weights  # False: run_window releases each layer's weights after the layer
        self.weight_cache = weight_cache  # optional disk cache of quantized weights (engine.models.weight_cache)
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)  # run_window's
        missing = [k for k in self._required() if k not in self.w]
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        self._cache: dict[tuple, torch.Tensor] = {}  # (tensor, format) -> stored weight
        rs = spec.rope_scaling or {}
        self._longrope = rs.get("rope_type") == "longrope"
        self._rope_orig = int(rs.get("original_max_position_embeddings", 0))
        self._rope_scale = float(rs.get("attention_factor", 1.0)) if self._longrope else 1.0
        self.rope_context = rope_context  # longrope: the length that picks long or short factors
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (long?, fmt) -> (cos, signed sin)

    def _required(self) -> list[str]:
        req = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.spec.tied_embeddings:
            req.append("lm_head.weight")
        for i in range(self.spec.n_layers):
            p = f"model.layers.{i}."
            req += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            req += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            req += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
            if self.spec.qkv_bias:
                req += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        return req

    # --- weights, quantized once per (tensor, format) ----------------------------------------
    def weight(self, name: str, fmt: str) -> torch.Tensor:
        """A stored [in, out] weight ('L.wqkv', 'L.wo', 'L.w13', 'L.w2', 'lm_head' or a vocabulary
        chunk 'lm_head[a:b]') or a small vector ('L.bqkv', a norm weight name) in `fmt`, host
        rounding, cached. Matrices in a format other than fp32 are held as torch.bfloat16 (every
        bf16 / bfp8 / bfp4 value is exactly a bf16 value; fidelity.matmul widens them to fp32).
        With a `weight_cache` the quantized matrix is read from (or written to) disk."""
        key = (name, fmt)
        t = self._cache.get(key)
        if t is None:
            disk = self.weight_cache if fmt != FULL and _is_matrix(name) else None
            t = disk.get(name, fmt) if disk is not None else None
            if t is None:
                t = self._make_weight(name, fmt)
                if fmt != FULL and t.dim() == 2:  # bf16 / bfp values are exact in bf16: half the memory
                    b = t.to(torch.bfloat16)
                    t = b if torch.equal(b.float(), t) else t
                if disk is not None:
                    disk.put(name, fmt, t)
            t = t.to(self.device)
            self._cache[key] = t
        return t

    def release_layer(self, i: int) -> None:
        """Drop decoder layer i's quantized weights from memory (layer-streamed runs)."""
        for key in [k for k in self._cache if k[0].partition(".")[0] == str(i)
                    or k[0].startswith(f"model.layers.{i}.")]:
            del self._cache[key]

    def _src(self, name: str) -> torch.Tensor:
        t = self.w[name]
        if self.device.type == "cuda":  # pinned host memory: the copy runs beside the compute
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def lm_head_chunks(self) -> list[tuple[int, int]]:
        """Vocabulary ranges the LM head is read and multiplied in (multiples of 32 rows, so no bfp
        block or tile straddles two chunks): each holds at most LM_HEAD_CHUNK_BYTES of fp32."""
        return vocab_chunks(self.spec.vocab, self.spec.hidden, LM_HEAD_CHUNK_BYTES, ROWS)

    def _make_weight(self, name: str, fmt: str) -> torch.Tensor:
        w = _Reader(self)
        q = lambda t: formats.quantize(t, fmt, rounding="host")  # noqa: E731
        layer, _, kind = name.partition(".")
        a = f"model.layers.{layer}.self_attn."
        m = f"model.layers.{layer}.mlp."
        if kind in ("wqkv", "bqkv"):
            what = "weight" if kind == "wqkv" else "bias"
            qw, kw, vw = (w[a + f"{n}_proj.{what}"] for n in "qkv")
            fused = torch.cat([to_meta(qw, self.spec.head_dim), to_meta(kw, self.spec.head_dim), vw])
            return q(fused.T.contiguous() if kind == "wqkv" else fused)
        if kind == "wo":
            return q(w[a + "o_proj.weight"].T.contiguous())
        if kind == "w13":
            return torch.cat([q(w[m + "gate_proj.weight"].T.contiguous()), q(w[m + "up_proj.weight"].T.contiguous())], 1)
        if kind == "w2":
            return q(w[m + "down_proj.weight"].T.contiguous())
        if name.startswith("lm_head"):  # 'lm_head' or a vocabulary chunk 'lm_head[a:b]'
            src = "model.embed_tokens.weight" if self.spec.tied_embeddings else "lm_head.weight"
            if name == "lm_head":
                return q(w[src].T.contiguous())
            a, b = (int(v) for v in name[len("lm_head["):-1].split(":"))
            return q(self.w.row_block(src, a, b).to(self.device).T.contiguous())
        if name in w:  # norm weights, embedding table
            return q(w[name])
        raise KeyError(name)

    def clear_cache(self) -> None:
        self._cache.clear()

    # --- config --------------------------------------------------------------------------------
    def _layers(self, cfg: ModelConfig | Config) -> tuple[Config, ...]:
        if isinstance(cfg, Config):
            return (cfg,) * self.spec.n_layers
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig or Config, got {type(cfg).__name__}")
        if cfg.n_layers != self.spec.n_layers:
            raise ConfigError(
                f"ModelConfig has {cfg.n_layers} layers but {self.spec.name} has {self.spec.n_layers}; "
                f"use ModelConfig.uniform(cfg, {self.spec.n_layers}) or a per-layer config of that length"
            )
        return cfg.layers

    # --- RoPE tables ---------------------------------------------------------------------------
    def _table(self, long: bool, need: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n, head_dim] computed in fp32, held in `fmt` (tt_transformers' RotarySetup
        uploads them as bf16; fp32 in full-precision mode)."""
        cos, sin = self._tables.get((long, fmt), (torch.empty(0), torch.empty(0)))
        if need > cos.shape[0]:
            n = max(need, 2 * cos.shape[0], 1024)
            freqs = torch.arange(n, dtype=torch.int64)[:, None].float() * rope_inv_freq(self.spec, long)
            emb = freqs.repeat_interleave(2, dim=-1)  # Meta pair order: frequency i at dims 2i and 2i+1
            sign = torch.tensor([-1.0, 1.0]).repeat(self.spec.head_dim // 2)  # out[2i] -= x[2i+1] sin_i
            cos, sin = emb.cos(), emb.sin() * sign
            if self._rope_scale != 1.0:  # longrope's attention factor scales cos and sin
                cos, sin = cos * self._rope_scale, sin * self._rope_scale
            cos, sin = rnd(cos, fmt).to(self.device), rnd(sin, fmt).to(self.device)
            self._tables[(long, fmt)] = cos, sin
        return cos, sin

    def _rope(self, pos: torch.Tensor, prefill: bool, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [M, 1, D] for positions `pos`, held in `fmt`. longrope takes its long factors
        when the sequence exceeds the pretraining length: the sequence is `rope_context` when set (the
        whole evaluation, as its reference forward sees it), else, like transformers' generate, the
        highest position of a prefill + 1, or each decode row's position + 1 (so decode_batched
        stays equal to decode_step)."""
        need = int(pos.max()) + 1
        if self._longrope and self.rope_context is None and not prefill:  # per decode row
            (cs, ss), (cl, sl) = self._table(False, need, fmt), self._table(True, need, fmt)
            row_long = (pos + 1 > self._rope_orig)[:, None, None]
            return torch.where(row_long, cl[pos][:, None], cs[pos][:, None]), torch.where(row_long, sl[pos][:, None], ss[pos][:, None])
        long = self._longrope and (self.rope_context or need) > self._rope_orig
        cos, sin = self._table(long, need, fmt)
        return cos[pos][:, None], sin[pos][:, None]

    # --- one decoder layer ---------------------------------------------------------------------
    def set_assumptions(self, assumptions: dict[str, str] | None) -> None:
        """The switches of engine.vocab.assumptions this model runs under (None: the defaults)."""
        self.assumptions = self.profile.assumptions(assumptions)
        #: (rounding, gasket ties) of a compute op's block-format output (the `bfp_pack` switch)
        self.pack = ("packer" if self.assumptions["bfp_pack"] == "double" else "device", self.assumptions["gasket_ties"])

    def _pack(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
        """A compute op's output rounded to `fmt` (the packer's rule under the assumptions)."""
        return rnd(x, fmt, self.pack)

    def _linear(self, setting: FidelitySetting, x: torch.Tensor, w: torch.Tensor, k_block: int | None,
                out: str, interm: str | None, split: int = 1) -> torch.Tensor:
        """A linear rounded to `out`. `split` > 1: K split over that many chips (tensor parallel):
        each chip's partial is rounded to `out`, and the reduce-scatter adds them in `out`, chip
        after chip (tt/ccl.py tt_all_reduce on N300 / T3K: no cast to ccl_dtype off Galaxy)."""
        if split == 1:
            return self._pack(mm(setting, x, w, k_block, out, interm), out)
        k = w.shape[0] // split
        acc = None
        for j in range(split):
            part = self._pack(mm(setting, x[..., j * k:(j + 1) * k], w[j * k:(j + 1) * k], k_block, out, interm), out)
            acc = part if acc is None else self._pack(acc + part, out)
        return acc

    def layer_weights(self, i: int, c: Config) -> dict[str, tuple[str, str]]:
        """(tensor, format) of every weight decoder layer i reads under `c`: the one list that the
        layer and the prefetcher (`run_window`) read."""
        small = FULL if _full(c) else "bf16"  # norm weights and biases
        p = f"model.layers.{i}."
        keys = {"ln1": (p + "input_layernorm.weight", small), "wqkv": (f"{i}.wqkv", c.wqkv.value),
                "wo": (f"{i}.wo", c.wo.value), "ln2": (p + "post_attention_layernorm.weight", small),
                "w13": (f"{i}.w13", c.ff1_3.value), "w2": (f"{i}.w2", c.ff2.value)}
        if self.spec.qkv_bias:
            keys["bqkv"] = (f"{i}.bqkv", small)
        return keys

    def _layer(self, i: int, c: Config, h: torch.Tensor, h_fmt: str, n_real: int, cache: KVCache, start: int,
               prefill: bool, rope: tuple, mask: torch.Tensor) -> tuple[torch.Tensor, str]:
        """h [M, hidden] held in `h_fmt` (rows >= n_real are padding); writes K/V of the real rows at
        cache positions start..start+n_real-1; `mask` [M, L] is 0 / -inf over the keys attended.
        Returns the layer output and its dtype (the module docstring's rules)."""
        s = self.spec
        full = _full(c)

        W = self.layer_weights(i, c)
        kv = c.kv_cache.value
        blk = self._prog[prefill]
        act = None if c.activation is None else c.activation.value

        def interm(op: str) -> str | None:  # decode linears are DRAM-sharded: Float16_b partials
            return ops.partials(op, prefill, act)

        li_qkv, li_o = ("li_qkv_prefill", "li_o_prefill") if prefill else ("li_qkv_decode", "li_o_decode")
        M, H, nkv, D = h.shape[0], s.n_heads, s.n_kv_heads, s.head_dim

        # attention block: the layer input is typecast to the activation dtype (tt/model.py)
        x_fmt = _out(c, "norm", h_fmt)
        h = rnd(h, x_fmt)
        x = _rms_norm(h, self.weight(*W["ln1"]), s.rms_eps, x_fmt, self.pack, self.profile.rmsnorm_hifi2)
        qkv_fmt = _out(c, li_qkv)
        qkv = self._linear(getattr(c, li_qkv), x, self.weight(*W["wqkv"]), blk.qkv, qkv_fmt, interm(li_qkv))
        if s.qkv_bias:  # added after the qkv output is rounded (attention.py), in the output's dtype
            qkv = self._pack(qkv + self.weight(*W["bqkv"]), qkv_fmt)
        qkv = qkv.reshape(M, H + 2 * nkv, D)
        qk = self._rope_apply(qkv[:, : H + nkv], rope, FULL if full else "bf16")  # RoPE on q and k heads together, in bf16
        q_fmt = _out(c, "q_prefill" if prefill else "q_decode")  # decode Q is never typecast
        q = rnd(qk[:, :H], q_fmt)  # [M, H, D]
        k = rnd(qk[:, H:], kv)  # [M, nkv, D]
        v = rnd(qkv[:, H + nkv:], kv)
        end = start + n_real
        cache.kt[i][:, :, start:end] = k[:n_real].permute(1, 2, 0)
        cache.v[i][:, start:end] = v[:n_real].transpose(0, 1)
        L = mask.shape[1]
        o = self._sdpa(q, cache.kt[i][:, :, :L], cache.v[i][:, :L], mask,
                       c.sdpa_prefill if prefill else c.sdpa_decode, q_fmt, self._chunk(prefill, L, full))
        wo_fmt = _out(c, li_o)  # decode wo: dtype=None, the SDPA output's
        if not prefill and self.wo_split == 1 and self.tp > 1:  # all_gather_matmul: hifi2, fp32 partials, any li_o_decode
            o = self._linear(FidelitySetting.HIFI2, o, self.weight(*W["wo"]), blk.wo, wo_fmt, None, 1)
        else:
            o = self._linear(getattr(c, li_o), o, self.weight(*W["wo"]), blk.wo, wo_fmt, interm(li_o), self.wo_split)
        h = self._pack(h + o, x_fmt)  # first residual add: dtype=None keeps the residual's dtype

        # MLP block
        x = _rms_norm(h, self.weight(*W["ln2"]), s.rms_eps, x_fmt, self.pack, self.profile.rmsnorm_hifi2)
        f13 = _out(c, "li_ff1_3")
        gu = mm(c.li_ff1_3, x, self.weight(*W["w13"]), blk.w13, f13, interm("li_ff1_3"))
        if s.intermediate % formats.BLOCK == 0:  # no block straddles w1 | w3: round both at once
            g, u = self._pack(gu, f13).split(s.intermediate, dim=-1)
        else:
            g, u = (self._pack(t.contiguous(), f13) for t in gu.split(s.intermediate, dim=-1))
        g = g if full else self._pack(self.silu(g), f13)  # the mul's fused SiLU pre-activation, packed in w1's dtype
        y = self._pack(g * u, _out(c, "silu_mul")) if not full else F.silu(g) * u
        d = self._linear(c.li_ff2, y, self.weight(*W["w2"]), blk.w2, _out(c, "li_ff2"), interm("li_ff2"), self.tp)
        out = _out_format(c)
        return self._pack(h + d, out), out  # second residual add: dtype = activation or bf16

    def _rope_apply(self, x: torch.Tensor, rope: tuple, fmt: str) -> torch.Tensor:
        """RoPE on Meta-ordered heads x [M, heads, D] as rotary_embedding_llama computes it (HiFi4, bf16
        dest): rot = x @ trans_mat swaps each pair (exact), out = x * cos + rot * signed sin, each
        product and the sum rounded to `fmt` (bf16; fp32 in full-precision mode: no rounding)."""
        cos, sin_signed = rope
        M, nh, D = x.shape
        swapped = x.reshape(M, nh, D // 2, 2).flip(-1).reshape(M, nh, D)
        if fmt == FULL:
            return x * cos + swapped * sin_signed
        return rnd(rnd(x * cos, fmt) + rnd(swapped * sin_signed, fmt), fmt)

    def _chunk(self, prefill: bool, L: int, full: bool) -> int:
        """SDPA K-chunk size: SDPA_PROGCFG (64, or 256 from 2048 tokens) in prefill, SDPA_DECODE_PROGCFG
        (256) in decode; the whole row in full-precision mode."""
        if full:
            return L
        return (256 if L >= 2048 else 64) if prefill else 256

    def _sdpa(self, q, kt, v, mask, setting: FidelitySetting, q_fmt: str, chunk: int) -> torch.Tensor:
        """Flash attention as sdpa_program_factory / sdpa_decode run it. q [M, H, D]; kt [n_kv, D, L],
        v [n_kv, L, D] hold positions 0..L-1; mask [M, L] adds 0 / -inf. Grouped-query: q head h
        reads kv head h // (H / n_kv). Per K chunk: S = Q K^T, running max m, P = exp((S - m) * scale),
        row sum l, O = P V; earlier chunks rescaled by exp((m_old - m) * scale); scores, P, m, l and
        O held in bf16 between steps (Float16_b circular buffers); out = O * recip(l) in Q's dtype.
        The scale is the fp32 1/sqrt(D) truncated to bf16 (`scale_fp32 >> 16`)."""
        M, H, D = q.shape
        nkv, L = v.shape[0], v.shape[1]
        G = H // nkv
        full = q_fmt == FULL
        im = FULL if full else "bf16"
        kern = setting.kernel
        exp_approx = kern.approx and self.sdpa_exp_approx
        scale = sdpa_scale(D, full)
        # current tt-metal, 16-bit dest: the subtraction of the running max is packed to bf16 before exp
        dest16_sub = self.profile.sdpa_max_bf16 and not full and not kern.fp32_dest

        def max_round(t: torch.Tensor) -> torch.Tensor:
            return rnd(t, "bf16") if dest16_sub else t

        qh = q.reshape(M, nkv, G, D).permute(1, 2, 0, 3).reshape(nkv, G * M, D)
        maskg = mask.repeat(G, 1)
        m = l = o = None
        for c0 in range(0, L, chunk):
            c1 = min(L, c0 + chunk)
            sc = rnd(mm(setting, qh, kt[:, :, c0:c1], None, im), im) + maskg[:, c0:c1]
            m_new = sc.amax(-1, keepdim=True) if m is None else torch.maximum(m, sc.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # a fully masked row so far adds nothing
            pr = rnd(fidelity.exp(max_round(sc - m_safe) * scale, exp_approx), im)
            lc = rnd(pr.sum(-1, keepdim=True), im)
            oc = rnd(mm(setting, pr, v[:, c0:c1], None, im), im)
            if m is None:
                l, o = lc, oc
            else:
                alpha = rnd(torch.where(torch.isneginf(m), 0.0, fidelity.exp(max_round(m - m_safe) * scale, exp_approx)), im)
                l = rnd(rnd(l * alpha, im) + lc, im)
                o = rnd(rnd(o * alpha, im) + oc, im)
            m = m_new
        out = o / l if full else o * rnd(fidelity.recip(l, kern.approx), im)
        return self._pack(out.view(nkv, G, M, D).permute(2, 0, 1, 3).reshape(M, H * D), q_fmt)

    # --- whole model ---------------------------------------------------------------------------
    def _frame(self, n: int, start: int, prefill: bool, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and the 0 / -inf mask [M, L] of n rows at cache positions start..start+n-1.
        Decode pads the rows to whole tiles (the padding rows sit at the last real position) and
        reads the cache's whole buffer, masked (L = capacity); prefill reads keys 0..start+n-1.
        Makes room in `cache` for the rows."""
        pos = torch.arange(start, start + n, device=self.device)
        if not prefill:
            pos = torch.cat([pos, pos[-1].repeat((-n) % ROWS)])
        cache.reserve(start + n)
        L = start + n if prefill else cache.capacity
        keys = torch.arange(L, device=self.device)[None, :]
        hidden = keys > pos[:, None]  # causal
        if self.spec.sliding_window:  # transformers: key > query - window
            hidden |= keys <= pos[:, None] - self.spec.sliding_window
        return pos, torch.zeros(pos.shape[0], L, device=self.device).masked_fill_(hidden, float("-inf"))

    def input_format(self, cfg: ModelConfig | Config | tuple[Config, ...], i: int) -> str:
        """The dtype decoder layer i's input is held in under `cfg`: the embedding's (bf16, fp32 when
        every layer is in full-precision mode) for layer 0, else layer i-1's output dtype."""
        layers = cfg if isinstance(cfg, tuple) else self._layers(cfg)
        if not 0 <= i < len(layers):
            raise IndexError(f"layer {i} out of range for {self.spec.name} ({len(layers)} layers)")
        if i == 0:
            return FULL if all(_full(c) for c in layers) else "bf16"
        return _out_format(layers[i - 1])

    @torch.inference_mode()
    @_under_assumptions
    def layer_forward(self, i: int, cfg: Config, h_prefill: torch.Tensor, h_decode: torch.Tensor, *,
                      h_fmt: str = "bf16", capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer i alone under `cfg`, split as a trial runs it: the prefill op groups on
        h_prefill [P, hidden] (positions 0..P-1, a fresh KV cache), then the decode op groups on
        h_decode [D, hidden] (positions P..P+D-1, one batched teacher-forced pass attending that
        cache). `h_fmt` is the dtype the input is held in (`input_format`); the layer rounds its
        input as `_run` does. `capacity` is the cache's (default P + D, as the Evaluator sizes it:
        decode attends the whole buffer, so it sets the SDPA's key length). Returns the layer's
        outputs (y_prefill [P, hidden], y_decode [D, hidden]) as fp32 tensors, bit for bit what
        `prefill` + `decode_batched` compute for those rows when the inputs are the same."""
        s = self.spec
        if not 0 <= i < s.n_layers:
            raise IndexError(f"layer {i} out of range for {s.name} ({s.n_layers} layers)")
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be one layer's Config, got {type(cfg).__name__}")
        for name, t in (("h_prefill", h_prefill), ("h_decode", h_decode)):
            if t.dim() != 2 or t.shape[1] != s.hidden:
                raise ValueError(f"{name} must be [rows, {s.hidden}], got {tuple(t.shape)}")
        P, D = h_prefill.shape[0], h_decode.shape[0]
        cap = -(-max(capacity or P + D, P + D, 1) // ROWS) * ROWS
        kt = torch.zeros(s.n_kv_heads, s.head_dim, cap, device=self.device)
        v = torch.zeros(s.n_kv_heads, cap, s.head_dim, device=self.device)
        cache = KVCache([kt] * s.n_layers, [v] * s.n_layers, 0)  # only layer i's slot is written: one buffer
        outs = []
        for rows, start, prefill in ((h_prefill, 0, True), (h_decode, P, False)):
            n = rows.shape[0]
            if n == 0:
                outs.append(torch.empty(0, s.hidden, device=self.device))
                continue
            h = rows.to(self.device, torch.float32)
            if not prefill:
                h = _pad_rows(h)
            pos, mask = self._frame(n, start, prefill, cache)
            y, _ = self._layer(i, cfg, h, h_fmt, n, cache, start, prefill, self._rope(pos, prefill, _rope_format(cfg)), mask)
            cache.length = start + n
            outs.append(y[:n])
        return outs[0], outs[1]

    def _run(self, tokens: torch.Tensor, layers: tuple[Config, ...], cache: KVCache, start: int,
             prefill: bool, rows: slice | None) -> torch.Tensor:
        """Embed, run every layer, final norm and LM head for h[rows] (None: all real rows)."""
        n = tokens.shape[0]
        full = all(_full(c) for c in layers)
        ug = self.input_format(layers, 0)
        h, h_fmt = self._embed(tokens, ug), ug
        if not prefill:  # pad to whole tiles of rows
            h = _pad_rows(h)
        pos, mask = self._frame(n, start, prefill, cache)
        ropes = {}
        for i, c in enumerate(layers):
            rfmt = _rope_format(c)
            if rfmt not in ropes:
                ropes[rfmt] = self._rope(pos, prefill, rfmt)
            h, h_fmt = self._layer(i, c, h, h_fmt, n, cache, start, prefill, ropes[rfmt], mask)
        cache.length = start + n
        return self._head(h[:n] if rows is None else h[rows], h_fmt, full, ug)

    def _embed(self, tokens: torch.Tensor, ug: str) -> torch.Tensor:
        """The embedding rows of `tokens` (read row by row from the store) in dtype `ug`."""
        return rnd(self.w.rows("model.embed_tokens.weight", tokens).to(self.device), ug)

    def _head(self, h: torch.Tensor, h_fmt: str, full: bool, ug: str) -> torch.Tensor:
        """Final norm and LM head of rows h [m, hidden] held in `h_fmt` -> logits [m, vocab] (fp32).
        The head is read and multiplied in vocabulary chunks (`lm_head_chunks`; every op is
        column-independent, so the chunks change no bit); `ug` is the embedding's dtype."""
        m = h.shape[0]
        x = _rms_norm(_pad_rows(h), self.weight("model.norm.weight", ug), self.spec.rms_eps, h_fmt, self.pack,
                      self.profile.rmsnorm_hifi2)  # keeps h's dtype
        fmt = FULL if full else self.lm_head_format
        if not full:
            x = x[:m]  # the emulated matmuls are row-independent: padding rows' logits are never read
        parts = []
        for a, b in self.lm_head_chunks():
            name = f"lm_head[{a}:{b}]"
            w = self.weight(name, fmt)
            if full:  # BLAS: keep whole tiles of rows so one row and many rows take the same kernel
                parts.append(torch.matmul(x, w)[:m])
            else:  # LM head: a DRAM-sharded matmul in both modes
                parts.append(mm(self.lm_head_setting, x, w, self._prog[False].lm_head, self.logits_format, "bf16"))
            if not self.keep_weights:
                self._cache.pop((name, fmt), None)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return logits if full else self._pack(logits, self.logits_format)

    @torch.inference_mode()
    @_under_assumptions
    def run_window(self, tokens: torch.Tensor, prefill: int, cfg: ModelConfig | Config, *,
                   capacity: int | None = None, resume: "LayerInputs | None" = None,
                   keep_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor, "LayerInputs | None"]:
        """A whole trial window LAYER BY LAYER: tokens [P + D] (P = `prefill`); each decoder layer
        runs its prefill rows (positions 0..P-1, filling that layer's KV cache), then its D decode
        rows in one teacher-forced batched pass against that cache, before the next layer is read
        (`layer_forward`, bit for bit what `prefill` + `decode_batched` compute). Only one layer's
        weights and KV cache are needed at a time (`keep_weights=False` releases them).

        `resume`: the inputs of a config that agrees with `cfg` on layers 0..L-1 (`LayerInputs`);
        the run starts at layer L from them. `keep_inputs`: also return every layer's input (for
        later resumes). Returns (logits of position P-1 [1, vocab], decode logits [D, vocab],
        LayerInputs or None)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        layers = self._layers(cfg)
        P = int(prefill)
        if not 1 <= P < len(tokens):
            raise ValueError(f"run_window needs 1 <= prefill < {len(tokens)} tokens, got {P}")
        full = all(_full(c) for c in layers)
        ug = self.input_format(layers, 0)
        start = resume.start_for(layers) if resume is not None else 0
        if start:
            hp, hd, h_fmt = resume.inputs[start]
        else:
            h = self._embed(tokens, ug)
            hp, hd, h_fmt = h[:P], h[P:], ug
        cap = capacity or len(tokens)
        kept = LayerInputs(layers, full) if keep_inputs else None
        if kept is not None and resume is not None:
            kept.inputs.update({i: v for i, v in resume.inputs.items() if i <= start})
        with _Prefetcher(self, layers) as ahead:
            for i in range(start, len(layers)):
                ahead.ready(i)  # layer i's weights are loaded; layer i+1's start loading beside it
                if kept is not None:
                    kept.inputs[i] = (hp, hd, h_fmt)
                hp, hd = self.layer_forward(i, layers[i], hp, hd, h_fmt=h_fmt, capacity=cap)
                h_fmt = _out_format(layers[i])
                if not self.keep_weights:
                    self.release_layer(i)
                    give_back_memory()
        logits = self._head(torch.cat([hp[-1:], hd]), h_fmt, full, ug)
        return logits[:1], logits[1:], kept

    def new_cache(self, capacity: int) -> KVCache:
        s = self.spec
        cap = -(-capacity // ROWS) * ROWS
        return KVCache(
            [torch.zeros(s.n_kv_heads, s.head_dim, cap, device=self.device) for _ in range(s.n_layers)],
            [torch.zeros(s.n_kv_heads, cap, s.head_dim, device=self.device) for _ in range(s.n_layers)],
            0,
        )

    @torch.inference_mode()
    @_under_assumptions
    def prefill(self, tokens: torch.Tensor, cfg: ModelConfig | Config, logits_for: str = "last",
                capacity: int | None = None) -> tuple[torch.Tensor, KVCache]:
        """Causal prefill of tokens [T] at positions 0..T-1 with the prefill op groups.

        Returns logits [T, vocab] (logits_for="all") or [1, vocab] for the last position ("last"),
        fp32, and a cache holding positions 0..T-1 with room for `capacity` positions (default 2T:
        a prefill-T + decode-(T-1) trial never grows it)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        layers = self._layers(cfg)
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        if logits_for not in ("last", "all"):
            raise ValueError(f"logits_for must be 'last' or 'all', got {logits_for!r}")
        cache = self.new_cache(max(capacity or 2 * len(tokens), len(tokens)))
        rows = slice(len(tokens) - 1, len(tokens)) if logits_for == "last" else None
        return self._run(tokens, layers, cache, 0, True, rows), cache

    @torch.inference_mode()
    @_under_assumptions
    def decode_batched(self, tokens: torch.Tensor, cache: KVCache, cfg: ModelConfig | Config) -> torch.Tensor:
        """Teacher-forced decode of tokens [S] at positions cache.length..cache.length+S-1 with the
        decode op groups: each token attends to the cache and the earlier tokens' quantized K/V,
        exactly as S `decode_step` calls would (bit for bit). Appends to `cache`; logits [S, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        layers = self._layers(cfg)
        if len(tokens) == 0:
            return torch.empty(0, self.spec.vocab)
        return self._run(tokens, layers, cache, cache.length, False, None)

    @_under_assumptions
    def decode_step(self, token: int, cache: KVCache, cfg: ModelConfig | Config) -> torch.Tensor:
        """One literal decode step at position cache.length; appends to `cache`; logits [vocab]."""
        return self.decode_batched(torch.tensor([int(token)]), cache, cfg)[0]

    def forward_fp32(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain fp32 logits [T, vocab] for every position (engine.vocab.config.REFERENCE)."""
        from engine.vocab.config import REFERENCE

        return self.prefill(tokens, REFERENCE, logits_for="all")[0]
