"""Math fidelity: the Wormhole matrix engine's phased multiply and dest accumulation, and the
vector unit's approximate exp / reciprocal (tt-numerics.md sections 1 and 3).

A setting is data (`Fidelity`); `matmul`, `exp` and `recip` take one, or a setting name:
the six tt-metal names (`SETTINGS`), `hifi3` (`HIFI3`: 3 phases, fp32 dest, packer L1 acc) and
`exact` (`EXACT = Fidelity(0, False, True, False)`: the fp32 reference path, a plain fp32
matmul and torch.exp).

Operands. `matmul(x, w, setting)` takes the activation x [..., M, K] (SrcB) and the weight w
[K, N] or [..., K, N] (SrcA). Both are read as bf16-style data (sign, 8-bit exponent, 7 mantissa
bits; the 19-bit source registers hold them exactly): bits beyond the 7th mantissa bit are
truncated and fp32 denormals flush to zero. The multiplier phases then use TRUNCATED slices:

    hi(w) = hidden one + top 4 mantissa bits     w7 = hidden one + top 7 bits (all of bf16)
    hi(x) = hidden one + top 6 mantissa bits     x7 = hidden one + top 7 bits, lo(x) = x7 - hi(x)

    LoFi (1 phase)   hi(x) @ hi(w)
    HiFi2 (2)        hi(x) @ w7                       (phases 0 + 1)
    HiFi3 (3)        hi(x) @ w7 + lo(x) @ hi(w)       (adds phase 2; computed as
                     x7 @ w7 - lo(x) @ (w7 - hi(w)), exact where either factor vanishes)
    HiFi4 (4)        x7 @ w7

so the emulation costs one real matmul (two for HiFi3), not one per phase. `phases=0` is the
emulator's exact mode: operands used as given (full fp32, no truncation, no flush).

Accumulation. The K dimension runs in 32-wide tiles. With fp32 dest the per-tile partials add in
fp32 (one fp32 matmul; summation order inside it is torch's). With 16-bit dest the running sum is
rounded to bf16 (nearest even) after every tile: S <- bf16(S + P_t), P_t the fp32 partial of tile
t (a ragged last tile is zero-padded). K blocks: `k_block` (elements, a multiple of 32) splits K
into blocks as tt-metal's in0_block_w does; the default None is one block holding all of K, for
which the packer flag changes nothing. With several blocks and `packer_l1_acc` on, each block's
dest result (starting from 0) is added into an L1 buffer held in the output format
(`out_fmt`, bf16 by default; bfp formats use device rounding): acc <- q_out(acc + D_b). With it
off the partials stay in dest, which carries on accumulating at dest precision across blocks.

The result is float32; the caller rounds it to the op's output dtype.

`exp(x, approx)` / `recip(x, approx)`: exact (torch) or the SFPU's approximate-mode algorithms
(see their docstrings for the measured errors). Only settings with approx=True use them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import formats

TILE_K = 32  # K elements per dest accumulation step (one tile)
_PARTIAL_BUDGET = 1 << 22  # floats per chunk of bf16-dest partials (16 MiB)


@dataclass(frozen=True)
class Fidelity:
    """A compute-kernel setting: `phases` 1-4 multiplier phases (0 = exact fp32 operands),
    `approx` SFPU approximate mode (exp/recip only), `fp32_dest` fp32 (else bf16) dest
    accumulation, `packer_l1_acc` partial sums over K blocks accumulated by the packer in L1."""

    phases: int
    approx: bool
    fp32_dest: bool
    packer_l1_acc: bool

    def __post_init__(self):
        if not isinstance(self.phases, int) or isinstance(self.phases, bool) or not 0 <= self.phases <= 4:
            raise ValueError(f"phases must be an int 1-4 (0 = exact), got {self.phases!r}")
        for name in ("approx", "fp32_dest", "packer_l1_acc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


#: The six named tt-metal settings (tt-numerics.md section 1).
SETTINGS: dict[str, Fidelity] = {
    "lofi": Fidelity(1, False, False, True),
    "hifi2": Fidelity(2, True, True, True),
    "hifi2na": Fidelity(2, False, False, False),
    "hifi2fp16": Fidelity(2, False, False, True),
    "hifi4": Fidelity(4, False, True, True),
    "hifi4fp32": Fidelity(4, True, True, True),
}

#: HiFi3 for sweeps (no tt-metal setting uses it): 3 phases, fp32 dest, packer L1 accumulation.
HIFI3 = Fidelity(3, False, True, True)

#: The emulator's exact reference: plain fp32 matmul (no truncation, fp32 accumulation), exact exp.
EXACT = Fidelity(0, False, True, False)

#: Every name `resolve` accepts: the six settings plus `hifi3` and `exact` (engine.config's
#: FidelitySetting values).
NAMED: dict[str, Fidelity] = {**SETTINGS, "hifi3": HIFI3, "exact": EXACT}


def resolve(setting) -> Fidelity:
    """A `Fidelity` from a setting name (or an enum whose value is one) or a `Fidelity`."""
    if isinstance(setting, Fidelity):
        return setting
    name = getattr(setting, "value", setting)
    if isinstance(name, str) and name in NAMED:
        return NAMED[name]
    raise ValueError(f"unknown fidelity setting {setting!r}; legal settings: {', '.join(NAMED)}")


# ------------------------------------------------------------------------------------------------
# Operand slices
# ------------------------------------------------------------------------------------------------

_DENORMAL_MAX = 2.0**-126 - 2.0**-149  # hardshrink keeps |v| > this: normals only


def _signed32(mask: int) -> int:
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def _keep(t: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """`t` truncated to `mantissa_bits` mantissa bits, fp32 denormals flushed to zero."""
    mask = _signed32((0xFFFFFFFF << (23 - mantissa_bits)) & 0xFFFFFFFF)
    kept = (t.contiguous().view(torch.int32) & mask).view(torch.float32)
    return torch.nn.functional.hardshrink(kept, _DENORMAL_MAX)


def _operand_pairs(x: torch.Tensor, w: torch.Tensor, phases: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(SrcB, SrcA) operand pairs whose products sum to the phases' product; a second pair is
    SUBTRACTED. HiFi3 = hi(x) w7 + lo(x) hi(w) is computed as x7 w7 - lo(x) (w7 - hi(w)), so it is
    bit-identical to HiFi4 when w has no bits past the 4th (bfp4) and to HiFi2 when lo(x) = 0."""
    if phases == 0:
        return [(x, w)]
    if phases == 4:
        return [(_keep(x, 7), _keep(w, 7))]
    xh = _keep(x, 6)
    if phases == 1:
        return [(xh, _keep(w, 4))]
    w7 = _keep(w, 7)
    if phases == 2:
        return [(xh, w7)]
    x7 = _keep(x, 7)
    return [(x7, w7), (x7 - xh, w7 - _keep(w, 4))]


# ------------------------------------------------------------------------------------------------
# matmul
# ------------------------------------------------------------------------------------------------


def _round_to(fmt: formats.Format, t: torch.Tensor) -> torch.Tensor:
    """Round an L1 partial to the output format (device rounding for block formats)."""
    return formats.quantize(t, fmt, "device")


def _fp32_dest(pairs, kb: int, K: int, l1: bool, out_fmt) -> torch.Tensor:
    """fp32 dest: one matmul per operand pair (per K block when the packer accumulates in L1)."""
    starts = range(0, K, kb) if l1 and kb < K else [0]
    acc = None
    for k0 in starts:
        k1 = K if len(starts) == 1 else min(K, k0 + kb)
        (xs, ws), *rest = pairs
        part = torch.matmul(xs[..., k0:k1], ws[..., k0:k1, :])
        for xs, ws in rest:
            part.baddbmm_(xs[..., k0:k1], ws[..., k0:k1, :], alpha=-1)
        acc = part if len(starts) == 1 else _round_to(out_fmt, part if acc is None else acc + part)
    return acc


def _tiles(xs: torch.Tensor, ws: torch.Tensor, pad: int):
    """x [B, M, K] -> [B, T, M, 32] (contiguous); w [B, K, N] -> [B, T, 32, N] (a view)."""
    if pad:
        xs = torch.nn.functional.pad(xs, (0, pad))
        ws = torch.nn.functional.pad(ws, (0, 0, 0, pad))
    B, M, K = xs.shape
    T = K // TILE_K
    xt = xs.reshape(B, M, T, TILE_K).permute(0, 2, 1, 3).contiguous()
    return xt, ws.reshape(ws.shape[0], T, TILE_K, ws.shape[-1]).expand(B, T, TILE_K, ws.shape[-1])


def _chunks(B: int, bc: int, N: int, nc: int, M: int, mc: int):
    """(b0, b1, n0, n1, m0, m1) ranges covering [B, M, N] in chunks."""
    for b0 in range(0, B, bc):
        for n0 in range(0, N, nc):
            for m0 in range(0, M, mc):
                yield b0, min(B, b0 + bc), n0, min(N, n0 + nc), m0, min(M, m0 + mc)


def _bf16_dest(pairs, kb: int, K: int, l1: bool, out_fmt) -> torch.Tensor:
    """bf16 dest: per-tile partials as one batched matmul over [K/32] tiles (chunked over batch,
    M and N so a chunk holds about _PARTIAL_BUDGET floats), then the sequential bf16-rounded
    running sum over the tiles."""
    pad = (-K) % TILE_K
    tiles = [_tiles(xs, ws, pad) for xs, ws in pairs]
    B, T, M, _ = tiles[0][0].shape
    N = tiles[0][1].shape[-1]
    block_tiles = kb // TILE_K
    blocks_end = set(range(block_tiles - 1, T - 1, block_tiles)) if l1 else set()
    mc = min(M, 256)
    nc = min(N, max(32, _PARTIAL_BUDGET // max(1, B * T * mc)))
    bc = min(B, max(1, _PARTIAL_BUDGET // max(1, T * mc * nc)))
    out = torch.empty(B, M, N, device=tiles[0][0].device)
    for b0, b1, n0, n1, m0, m1 in _chunks(B, bc, N, nc, M, mc):
        part = None
        for xt, wt in tiles:
            a = xt[b0:b1, :, m0:m1].reshape(-1, m1 - m0, TILE_K)
            b = wt[b0:b1, ..., n0:n1].reshape(-1, TILE_K, n1 - n0)
            part = torch.bmm(a, b) if part is None else part.baddbmm_(a, b, alpha=-1)
        part = part.view(b1 - b0, T, m1 - m0, n1 - n0)
        dest = torch.zeros(b1 - b0, m1 - m0, n1 - n0, dtype=torch.bfloat16, device=part.device)
        acc = None
        for t in range(T):
            torch.add(dest, part[:, t], out=dest)  # fp32 add, one rounding to bf16
            if t in blocks_end:  # packer L1 accumulation of this K block's result
                acc = _round_to(out_fmt, dest.float() if acc is None else acc + dest.float())
                dest.zero_()
        out[b0:b1, m0:m1, n0:n1] = dest.float() if acc is None else _round_to(out_fmt, acc + dest.float())
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, setting, *, k_block: int | None = None, out_fmt="bf16") -> torch.Tensor:
    """x [..., M, K] (activation, SrcB) @ w [K, N] or [..., K, N] (weight, SrcA) as the matrix
    engine computes it under `setting` (a name or `Fidelity`); float32 result [..., M, N].

    `k_block` (a multiple of 32, default all of K) and `out_fmt` (the L1 accumulation format)
    only matter with several K blocks; see the module docstring.
    """
    fid = resolve(setting)
    x = torch.as_tensor(x).detach().to(torch.float32)
    w = torch.as_tensor(w).detach().to(torch.float32)
    if x.dim() < 1 or w.dim() < 2 or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"matmul needs x [..., M, K] and w [..., K, N]; got {tuple(x.shape)} and {tuple(w.shape)}")
    K, N = w.shape[-2:]
    kb = K if k_block is None else int(k_block)
    if k_block is not None and (kb <= 0 or kb % TILE_K):
        raise ValueError(f"k_block must be a positive multiple of {TILE_K}, got {k_block!r}")
    ofmt = formats.get_format(out_fmt)
    l1 = fid.packer_l1_acc and kb < K
    if fid.phases == 0 and fid.fp32_dest and not l1:  # exact: plain fp32 matmul
        return torch.matmul(x, w)
    if w.dim() == 2:
        out_shape = (*x.shape[:-1], N)
        xb, wb = x.reshape(1, -1, K), w.unsqueeze(0)
    else:
        if x.dim() < 2:
            raise ValueError(f"a batched w {tuple(w.shape)} needs x [..., M, K], got {tuple(x.shape)}")
        batch = torch.broadcast_shapes(x.shape[:-2], w.shape[:-2])
        M = x.shape[-2]
        out_shape = (*batch, M, N)
        xb = x.expand(*batch, M, K).reshape(-1, M, K)
        wb = w.expand(*batch, K, N).reshape(-1, K, N)
    pairs = _operand_pairs(xb, wb, fid.phases)
    if fid.fp32_dest:
        y = _fp32_dest(pairs, kb, K, l1, ofmt)
    else:
        y = _bf16_dest(pairs, kb, K, l1, ofmt)
    return y.reshape(out_shape)


# ------------------------------------------------------------------------------------------------
# SFPU transcendental functions
# ------------------------------------------------------------------------------------------------

_LN2_RECIP = 1.442695  # the SFPU's programmed constant


def exp(x: torch.Tensor, approx=False) -> torch.Tensor:
    """e^x, exact (torch.exp) or as the SFPU computes it in approximate mode.

    `approx` is a bool or a setting (name / `Fidelity`, whose `approx` flag decides). Approximate
    mode is the Schraudolph bit trick of tt-metal's `_calculate_exponential_`: v = x * 1.442695 is
    made fixed point with 16 fraction bits (round to nearest) and shifted into the exponent field,
    giving 2^floor(v) * (1 + frac(v)), a piecewise-linear 2^v; x >= 89 gives inf, x < -42 gives 0.
    Measured max relative error over x in [-42, 88]: 6.15% (the result is never below e^x by more
    than 0.01%; the linear segment overshoots up to 6.1% at frac(v) = 0.44).
    """
    x = torch.as_tensor(x).detach().to(torch.float32)
    if not _approx(approx):
        return torch.exp(x)
    fixed = torch.round(x * _LN2_RECIP * 65536.0).to(torch.int32)  # v in fixed point, 16 fraction bits
    fixed = fixed.clamp(-127 * 65536, 128 * 65536)
    out = ((fixed + 127 * 65536) << 7).view(torch.float32)
    out = torch.where(x >= 89, torch.full_like(x, math.inf), out)
    out = torch.where(x < -42, torch.zeros_like(x), out)
    return torch.where(x.isnan(), x, out)


def recip(x: torch.Tensor, approx=False) -> torch.Tensor:
    """1/x, exact (torch.reciprocal) or as the SFPU computes it in approximate mode.

    Approximate mode is tt-metal's `_sfpu_reciprocal_<2>`: the mantissa m in [0.5, 1) gets the
    first guess 1.442695 * (2 - 1.442695 m), one Newton-Raphson step r <- r (2 - m r), and the
    exponent is restored. Measured max relative error: 3.84% (at m near 1; r never exceeds 1/m beyond fp32 rounding).
    Zero gives inf with the sign of x.
    """
    x = torch.as_tensor(x).detach().to(torch.float32)
    if not _approx(approx):
        return torch.reciprocal(x)
    m, e = torch.frexp(x.abs())  # |x| = m * 2^e, m in [0.5, 1)
    r = _LN2_RECIP * (2.0 - _LN2_RECIP * m)
    r = r * (2.0 - m * r)
    out = torch.ldexp(r, -e).copysign(x)
    return torch.where(x == 0, torch.full_like(x, math.inf).copysign(x), out)


def _approx(approx) -> bool:
    return approx if isinstance(approx, bool) else resolve(approx).approx
