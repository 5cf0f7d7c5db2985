"""A compact Llama-family decoder whose every op applies a ModelConfig's Wormhole numerics.

Read top to bottom: numerics helpers, RoPE, the KV cache, then `Model` (weights, one decoder
layer, attention, prefill / decode). Covers Llama 2/3 (incl. Llama 3 rope scaling), Mistral,
SmolLM2, Qwen2 (q/k/v biases) and Phi-3 / Phi-3.5 (the loader splits its fused weights; longrope
with its attention factor, long factors once the sequence passes the pretraining length):
RMSNorm, RoPE in Hugging Face's rotate_half convention, grouped-query attention (with a sliding
window where the config has one), SwiGLU MLP, tied or untied head.
Batch 1; tokens are 1-D LongTensors.

Numerics of one decoder layer i, from its Config c = cfg.layers[i] (tt-numerics.md sections 1-3)
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
          softmax's exp (fidelity.exp with the setting's approx flag) and P @ V (V = weight side).
Output dtypes (`activation`; device rounding for bfp):
  mixed   qkv, w1, w3, w2 outputs bf16; SiLU(w1)*w3 bfp8; Q (after RoPE, before attention) and
          the wo output bfp8 in prefill, bf16 in decode.
  bf16 / bfp8   forced on all of those outputs (prefill and decode).
  fp32    FULL-PRECISION MODE (the rule): a layer whose activation is fp32 rounds nothing that
          its config does not govern; its governed weights, K/V cache and fidelities still apply.
Ungoverned ops (RMSNorm, RoPE, residual adds, the softmax, SDPA output): computed in fp32, output
bf16 - or fp32 (no rounding) in full-precision mode. SiLU is fused into the product like tt-metal's
`ttnn.mul(w1, w3, input_tensor_a_activations=[SILU])`, so its only rounding is the product's. Norm
weights and q/k/v biases are held in bf16 (fp32 in full-precision mode); a bias is added in fp32
to the matmul output before that output is rounded. RoPE's cos/sin tables are fp32 (tt-metal
uploads them as bf16). Softmax: whole-row (tt-metal runs a chunked, online softmax) over the scaled,
masked scores in fp32 with exact exp and division (torch.softmax), because tt_transformers runs
SDPA's exp in exact mode whatever the setting's approx flag (tt-numerics.md section 3); with
`Model(..., sdpa_exp_approx=True)` a setting with approx mode uses the SFPU's approximate exp and
reciprocal instead (fidelity.exp / fidelity.recip), to study that choice. P rounded to bf16
before P @ V.

Model-level ops (embedding lookup, final norm, LM head) run in full precision iff EVERY layer is in
full-precision mode (so `engine.config.REFERENCE` is plain fp32 end to end and matches the
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

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from engine import fidelity, formats
from engine.config import Config, ConfigError, FidelitySetting, ModelConfig, Precision, fidelity_of
from engine.spec import ModelSpec

ROWS = 32  # tile height: decode and LM-head activations are padded to a multiple of it
FULL = "fp32"  # the no-rounding format name


# ------------------------------------------------------------------------------------------------
# Numerics helpers
# ------------------------------------------------------------------------------------------------
def rnd(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round an activation to `fmt` as the device writes it (fp32: unchanged)."""
    return x if fmt == FULL else formats.quantize(x, fmt, rounding="device")


@dataclass(frozen=True)
class Kernel:
    """One fidelity setting as the model uses it: matmul, exp and reciprocal."""

    setting: FidelitySetting
    fid: object  # what fidelity.matmul receives; None = plain fp32 matmul
    approx: bool

    def mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., M, K] (activation, SrcB) @ w [K, N] or [..., K, N] (weight, SrcA) -> fp32."""
        return torch.matmul(x, w.float()) if self.fid is None else fidelity.matmul(x, w, self.fid)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return fidelity.exp(x, True) if self.approx else torch.exp(x)

    def div(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """x / d; approximate settings multiply by the SFPU's approximate reciprocal."""
        return x * fidelity.recip(d, True) if self.approx else x / d


_KERNELS: dict[FidelitySetting, Kernel] = {}


def kernel_for(setting: FidelitySetting | str) -> Kernel:
    """The Kernel for a config fidelity setting, using fidelity's own definition of the name when
    it has one (`fidelity.resolve`); otherwise `hifi3` = Fidelity(3, approx=False, fp32_dest=True,
    packer_l1_acc=True) and `exact` = plain fp32 matmul with torch.exp."""
    setting = fidelity_of(setting)
    k = _KERNELS.get(setting)
    if k is None:
        try:
            fid = fidelity.resolve(setting.value)
        except (KeyError, ValueError):
            if setting is FidelitySetting.HIFI3:
                fid = fidelity.Fidelity(3, approx=False, fp32_dest=True, packer_l1_acc=True)
            elif setting is FidelitySetting.EXACT:
                fid = None
            else:
                raise
        approx = setting is not FidelitySetting.EXACT and bool(getattr(fid, "approx", False))
        k = _KERNELS[setting] = Kernel(setting, fid, approx)
    return k


def _fmt(p: Precision | None) -> str:
    return p.value


def _out_fmt(c: Config, what: str, prefill: bool) -> str:
    """Output dtype of a governed op: 'qkv', 'q', 'wo', 'w13', 'prod', 'w2'."""
    if c.activation is not None:
        return c.activation.value
    if what == "prod" or (prefill and what in ("q", "wo")):
        return "bfp8"
    return "bf16"


def _pad_rows(x: torch.Tensor, multiple: int = ROWS) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: str) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w in fp32 (transformers' LlamaRMSNorm), rounded to `out`."""
    return rnd(F.rms_norm(x, (x.shape[-1],), w, eps), out)


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


def _rope_apply(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [M, heads, D] * cos + rotate_half(x) * sin, with rotate_half(x) * sin computed as
    (halves of x swapped) * (sin with its first half negated): the same products, bit for bit."""
    M, nh, D = x.shape
    swapped = x.reshape(M, nh, 2, D // 2).flip(-2).reshape(M, nh, D)
    return x * cos + swapped * sin_signed


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
        lm_head: tuple[str, str] = ("bfp8", "hifi2"),
        logits_format: str = "bfp8",
        sdpa_exp_approx: bool = False,
        rope_context: int | None = None,
    ):
        if spec.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {spec.head_dim}")
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"n_heads {spec.n_heads} is not a multiple of n_kv_heads {spec.n_kv_heads}")
        self.spec = spec
        self.sdpa_exp_approx = sdpa_exp_approx  # False: exact exp in SDPA, as tt_transformers runs it
        self.lm_head_format, self.lm_head_kernel = lm_head[0], kernel_for(lm_head[1])
        formats.get_format(self.lm_head_format)
        self.logits_format = formats.get_format(logits_format).name
        self.w = {k: v.detach().to(torch.float32) for k, v in weights.items()}
        missing = [k for k in self._required() if k not in self.w]
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensors, e.g. {missing[:3]}")
        self._cache: dict[tuple, torch.Tensor] = {}  # (tensor, format) -> stored weight
        rs = spec.rope_scaling or {}
        self._longrope = rs.get("rope_type") == "longrope"
        self._rope_orig = int(rs.get("original_max_position_embeddings", 0))
        self._rope_scale = float(rs.get("attention_factor", 1.0)) if self._longrope else 1.0
        self.rope_context = rope_context  # longrope: the length that picks long or short factors
        self._tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # long? -> (cos, signed sin)

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
        """A stored [in, out] weight ('L.wqkv', 'L.wo', 'L.w13', 'L.w2', 'lm_head') or a small
        vector ('L.bqkv', a norm weight name) in `fmt`, host rounding, cached. Matrices in a
        format other than fp32 are held as torch.bfloat16 (every bf16 / bfp8 / bfp4 value is
        exactly a bf16 value; fidelity.matmul widens them to fp32)."""
        key = (name, fmt)
        t = self._cache.get(key)
        if t is None:
            t = self._make_weight(name, fmt)
            if fmt != FULL and t.dim() == 2:  # bf16 / bfp values are exact in bf16: half the memory
                b = t.to(torch.bfloat16)
                t = b if torch.equal(b.float(), t) else t
            self._cache[key] = t
        return t

    def _make_weight(self, name: str, fmt: str) -> torch.Tensor:
        w = self.w
        q = lambda t: formats.quantize(t, fmt, rounding="host")  # noqa: E731
        layer, _, kind = name.partition(".")
        a = f"model.layers.{layer}.self_attn."
        m = f"model.layers.{layer}.mlp."
        if kind == "wqkv":
            return q(torch.cat([w[a + f"{n}_proj.weight"] for n in "qkv"]).T.contiguous())
        if kind == "bqkv":
            return q(torch.cat([w[a + f"{n}_proj.bias"] for n in "qkv"]))
        if kind == "wo":
            return q(w[a + "o_proj.weight"].T.contiguous())
        if kind == "w13":
            return torch.cat([q(w[m + "gate_proj.weight"].T.contiguous()), q(w[m + "up_proj.weight"].T.contiguous())], 1)
        if kind == "w2":
            return q(w[m + "down_proj.weight"].T.contiguous())
        if name == "lm_head":
            src = "model.embed_tokens.weight" if self.spec.tied_embeddings else "lm_head.weight"
            return q(w[src].T.contiguous())
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
    def _table(self, long: bool, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._tables.get(long, (torch.empty(0), torch.empty(0)))
        if need > cos.shape[0]:
            n = max(need, 2 * cos.shape[0], 1024)
            freqs = torch.arange(n, dtype=torch.int64)[:, None].float() * rope_inv_freq(self.spec, long)
            emb = torch.cat((freqs, freqs), dim=-1)
            half = self.spec.head_dim // 2
            cos, sin = emb.cos(), torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), -1)
            if self._rope_scale != 1.0:  # longrope's attention factor scales cos and sin
                cos, sin = cos * self._rope_scale, sin * self._rope_scale
            self._tables[long] = cos, sin
        return cos, sin

    def _rope(self, pos: torch.Tensor, prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [M, 1, D] for positions `pos`. longrope takes its long factors when the
        sequence exceeds the pretraining length: the sequence is `rope_context` when set (the whole
        evaluation, as its reference forward sees it), else, like transformers' generate, the
        highest position of a prefill + 1, or each decode row's position + 1 (so decode_batched
        stays equal to decode_step)."""
        need = int(pos.max()) + 1
        if self._longrope and self.rope_context is None and not prefill:  # per decode row
            (cs, ss), (cl, sl) = self._table(False, need), self._table(True, need)
            row_long = (pos + 1 > self._rope_orig)[:, None, None]
            return torch.where(row_long, cl[pos][:, None], cs[pos][:, None]), torch.where(row_long, sl[pos][:, None], ss[pos][:, None])
        long = self._longrope and (self.rope_context or need) > self._rope_orig
        cos, sin = self._table(long, need)
        return cos[pos][:, None], sin[pos][:, None]

    # --- one decoder layer ---------------------------------------------------------------------
    def _layer(self, i: int, c: Config, h: torch.Tensor, n_real: int, cache: KVCache, start: int,
               prefill: bool, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
        """h [M, hidden] (rows >= n_real are padding); writes K/V of the real rows at cache
        positions start..start+n_real-1; `mask` [M, L] is 0 / -inf over the keys attended."""
        s = self.spec
        full = c.activation is Precision.FP32
        ug = FULL if full else "bf16"  # ungoverned ops' output format
        p = f"model.layers.{i}."
        kv = _fmt(c.kv_cache)
        qkv_k = kernel_for(c.li_qkv_prefill if prefill else c.li_qkv_decode)
        o_k = kernel_for(c.li_o_prefill if prefill else c.li_o_decode)
        sdpa_k = kernel_for(c.sdpa_prefill if prefill else c.sdpa_decode)
        M, H, nkv, D = h.shape[0], s.n_heads, s.n_kv_heads, s.head_dim

        # attention block
        x = _rms_norm(h, self.weight(p + "input_layernorm.weight", ug), s.rms_eps, ug)
        qkv = qkv_k.mm(x, self.weight(f"{i}.wqkv", _fmt(c.wqkv)))
        if s.qkv_bias:
            qkv = qkv + self.weight(f"{i}.bqkv", ug)
        qkv = rnd(qkv, _out_fmt(c, "qkv", prefill)).reshape(M, H + 2 * nkv, D)
        qk = rnd(_rope_apply(qkv[:, : H + nkv], *rope), ug)  # RoPE on q and k heads together
        q = rnd(qk[:, :H], _out_fmt(c, "q", prefill))  # [M, H, D]
        k = rnd(qk[:, H:], kv)  # [M, nkv, D]
        v = rnd(qkv[:, H + nkv:], kv)
        end = start + n_real
        cache.kt[i][:, :, start:end] = k[:n_real].permute(1, 2, 0)
        cache.v[i][:, start:end] = v[:n_real].transpose(0, 1)
        L = mask.shape[1]
        o = self._sdpa(q, cache.kt[i][:, :, :L], cache.v[i][:, :L], mask, sdpa_k, ug)
        o = rnd(o_k.mm(o, self.weight(f"{i}.wo", _fmt(c.wo))), _out_fmt(c, "wo", prefill))
        h = rnd(h + o, ug)

        # MLP block
        x = _rms_norm(h, self.weight(p + "post_attention_layernorm.weight", ug), s.rms_eps, ug)
        gu = kernel_for(c.li_ff1_3).mm(x, self.weight(f"{i}.w13", _fmt(c.ff1_3)))
        f13 = _out_fmt(c, "w13", prefill)
        if s.intermediate % formats.BLOCK == 0:  # no block straddles w1 | w3: round both at once
            g, u = rnd(gu, f13).split(s.intermediate, dim=-1)
        else:
            g, u = (rnd(t.contiguous(), f13) for t in gu.split(s.intermediate, dim=-1))
        y = rnd(F.silu(g) * u, _out_fmt(c, "prod", prefill))
        d = rnd(kernel_for(c.li_ff2).mm(y, self.weight(f"{i}.w2", _fmt(c.ff2))), _out_fmt(c, "w2", prefill))
        return rnd(h + d, ug)

    def _sdpa(self, q, kt, v, mask, k: Kernel, ug: str) -> torch.Tensor:
        """q [M, H, D]; kt [n_kv, D, L], v [n_kv, L, D] hold positions 0..L-1; mask [M, L] adds
        0 / -inf. Grouped-query: q head h reads kv head h // (H / n_kv). Returns [M, H*D] in `ug`."""
        M, H, D = q.shape
        nkv, L = v.shape[0], v.shape[1]
        G = H // nkv
        qh = q.reshape(M, nkv, G, D).permute(1, 2, 0, 3).reshape(nkv, G * M, D)
        scores = k.mm(qh, kt).view(nkv, G, M, L)
        scores.mul_(1.0 / math.sqrt(D)).add_(mask)
        if k.approx and self.sdpa_exp_approx:  # the SFPU's approximate exp and reciprocal
            scores.sub_(scores.amax(-1, keepdim=True))
            e = k.exp(scores)  # exp(-inf) = 0
            prob = k.div(e, e.sum(-1, keepdim=True))
        else:
            prob = torch.softmax(scores, dim=-1)
        prob = rnd(prob, ug)
        o = k.mm(prob.view(nkv, G * M, L), v).view(nkv, G, M, D)
        return rnd(o.permute(2, 0, 1, 3).reshape(M, H * D), ug)

    # --- whole model ---------------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, layers: tuple[Config, ...], cache: KVCache, start: int,
             prefill: bool, rows: slice | None) -> torch.Tensor:
        """Embed, run every layer, final norm and LM head for h[rows] (None: all real rows)."""
        s = self.spec
        n = tokens.shape[0]
        full = all(c.activation is Precision.FP32 for c in layers)
        ug = FULL if full else "bf16"
        emb = self.w["model.embed_tokens.weight"]
        h = rnd(emb[tokens], ug)
        pos = torch.arange(start, start + n)
        if not prefill:  # pad to whole tiles of rows; padding rows sit at the last real position
            h = _pad_rows(h)
            pos = torch.cat([pos, pos[-1].repeat(h.shape[0] - n)])
        cache.reserve(start + n)
        L = start + n if prefill else cache.capacity  # decode reads the whole buffer, masked
        keys = torch.arange(L)[None, :]
        hidden = keys > pos[:, None]  # causal
        if self.spec.sliding_window:  # transformers: key > query - window
            hidden |= keys <= pos[:, None] - self.spec.sliding_window
        mask = torch.zeros(h.shape[0], L).masked_fill_(hidden, float("-inf"))
        rope = self._rope(pos, prefill)
        for i, c in enumerate(layers):
            h = self._layer(i, c, h, n, cache, start, prefill, rope, mask)
        cache.length = start + n
        h = h[:n] if rows is None else h[rows]
        m = h.shape[0]
        h = _pad_rows(h)
        x = _rms_norm(h, self.weight("model.norm.weight", ug), s.rms_eps, ug)
        if full:
            return torch.matmul(x, self.weight("lm_head", FULL))[:m]
        logits = self.lm_head_kernel.mm(x, self.weight("lm_head", self.lm_head_format))
        return rnd(logits, self.logits_format)[:m]

    def new_cache(self, capacity: int) -> KVCache:
        s = self.spec
        cap = -(-capacity // ROWS) * ROWS
        return KVCache(
            [torch.zeros(s.n_kv_heads, s.head_dim, cap) for _ in range(s.n_layers)],
            [torch.zeros(s.n_kv_heads, cap, s.head_dim) for _ in range(s.n_layers)],
            0,
        )

    @torch.inference_mode()
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
    def decode_batched(self, tokens: torch.Tensor, cache: KVCache, cfg: ModelConfig | Config) -> torch.Tensor:
        """Teacher-forced decode of tokens [S] at positions cache.length..cache.length+S-1 with the
        decode op groups: each token attends to the cache and the earlier tokens' quantized K/V,
        exactly as S `decode_step` calls would (bit for bit). Appends to `cache`; logits [S, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        layers = self._layers(cfg)
        if len(tokens) == 0:
            return torch.empty(0, self.spec.vocab)
        return self._run(tokens, layers, cache, cache.length, False, None)

    def decode_step(self, token: int, cache: KVCache, cfg: ModelConfig | Config) -> torch.Tensor:
        """One literal decode step at position cache.length; appends to `cache`; logits [vocab]."""
        return self.decode_batched(torch.tensor([int(token)]), cache, cfg)[0]

    def forward_fp32(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain fp32 logits [T, vocab] for every position (engine.config.REFERENCE)."""
        from engine.config import REFERENCE

        return self.prefill(tokens, REFERENCE, logits_for="all")[0]
