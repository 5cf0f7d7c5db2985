"""Math fidelity: the Wormhole matrix engine's phased multiply and dest accumulation, and the
vector unit's approximate exp / reciprocal (docs/NUMERICS.md).

A setting is data: `Fidelity(phases, approx, fp32_dest, packer_l1_acc)`. `SETTINGS`
(engine.vocab.fidelity, torch-free) is THE table of named settings (the six tt-metal names, `hifi3` and the emulator's `exact`); engine.vocab.config's
`FidelitySetting` enum members carry these records (`.kernel`), and every consumer (the model, the
equivalence rules, the performance model) reads them from there.

Operands. `matmul(x, w, setting, k_block=None)` takes the activation x [..., M, K] (SrcB) and the
weight w [K, N] or [..., K, N] (SrcA). Both are read as bf16-style data (sign, 8-bit exponent, 7
mantissa bits; the 19-bit source registers hold them exactly): bits beyond the 7th mantissa bit are
truncated and fp32 denormals flush to zero. Fidelity phase p multiplies TRUNCATED slices:

    wh = hidden one + top 4 mantissa bits of w     wl = the next 3 bits   (w7 = wh + wl)
    xh = hidden one + top 6 mantissa bits of x     xl = the 7th bit       (x7 = xh + xl)
    phase 0: xh * wh    phase 1: xh * wl    phase 2: xl * wh    phase 3: xl * wl
    LoFi runs phase 0, HiFi2 phases 0-1, HiFi3 0-2, HiFi4 0-3.

`phases=0` is the emulator's exact mode: operands used as given (full fp32, no truncation).

Accumulation (ISA MVMUL / Dst; matmul program factories):
* fp32 dest: every phase and tile adds into an fp32 dest, and with packer L1 accumulation the
  K blocks' results add in a Float32 L1 buffer: the sum of all phases' products in fp32, computed
  as one real matmul (x7 @ w7 for HiFi4, xh @ w7 for HiFi2, xh @ wh for LoFi; HiFi3 as
  x7 @ w7 - xl @ wl). Summation order inside it is the BLAS's.
* 16-bit (bf16) dest: one MVMUL multiplies a 16-wide K slice and writes RoundToBF16 (nearest
  even) of (dest + the slice's partial) into dest. Within a 32-wide tile the phase loop is OUTER:
  per tile, phase 0 slice 0, phase 0 slice 1, phase 1 slice 0, ... so the running sum is rounded
  2 x phases times per tile. The 16 products of a slice (exact in fp32: <= 8-bit significands)
  are summed in fp32 in k order. A ragged last tile is zero-padded (zero slices change nothing).
* K blocks (bmm_large_block_zm_fused_bias_activation + the matmul program factories): K runs in
  blocks of `k_block` elements (tt-metal's in0_block_w tiles x 32; None = all of K in one block),
  and dest restarts at 0 for each block. Partials live in L1 in `partials_format`: with packer L1
  accumulation (engaged only when there is more than one block) Float32 (fp32 dest) or Float16_b
  (16-bit dest); without it Float32 (fp32 dest) or the op's OUTPUT format (16-bit dest); the
  DRAM-sharded decode matmuls override it to Float16_b (`interm="bf16"`). With packer L1 acc the
  packer adds blocks 0..n-2 into L1, acc <- part(acc + D_b), and the LAST block starts from the
  reloaded acc in dest; without it every block after the first starts from the reloaded partial
  and spills again.

The result is float32 holding the final dest / L1 values; the caller rounds it to the op's output
dtype. The bf16-dest walk runs in a small compiled kernel (engine.numerics.native: kernels/dest16.c) when a C
compiler exists, else in a torch loop that computes the same bits (`dest16_torch`).

`exp(x, approx)` / `recip(x, approx)`: exact (torch) or the SFPU's approximate-mode algorithms
(see their docstrings for the measured errors).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from engine.numerics import formats, native
from engine.vocab.fidelity import EXACT, SETTINGS, SILU_MODES, SLICE_K, TILE_K, Fidelity, Setting, resolve  # noqa: F401 (the table)

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


def _combined_pairs(x: torch.Tensor, w: torch.Tensor, phases: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(SrcB, SrcA) pairs whose products sum (a second pair SUBTRACTED) to all phases' products:
    one real matmul for an fp32 dest. HiFi3 = xh w7 + xl wh is x7 w7 - xl (w7 - wh), so it is
    bit-identical to HiFi4 when w has no bits past the 4th (bfp4) and to HiFi2 when xl = 0."""
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


def eltwise_mul(a: torch.Tensor, b: torch.Tensor, setting) -> torch.Tensor:
    """a * b elementwise as the FPU multiplies at a fidelity setting with an fp32 dest: in0 (`a`)
    in SrcA, in1 (`b`, broadcast) in SrcB, each phase's truncated slices multiplied and the phases
    summed in fp32 (*assumption*: the operand roles follow the matmul's, in0 -> SrcA). Used by
    the current profile's RMSNorm (models/common/rmsnorm.py runs at HiFi2)."""
    pairs = _combined_pairs(b, a, resolve(setting).phases)
    out = pairs[0][0] * pairs[0][1]
    return out - pairs[1][0] * pairs[1][1] if len(pairs) > 1 else out


def x_phases(x: torch.Tensor, phases: int) -> torch.Tensor:
    """The activation's per-phase slices stacked on dim 1: x [B, M, K] -> [B, P, M, K]
    (phases 0-1 read xh, 2-3 xl)."""
    if phases == 0:
        return x.unsqueeze(1)
    xh = _keep(x, 6)
    xl = _keep(x, 7) - xh if phases > 2 else None
    return torch.stack([xh, xh, xl, xl][:phases], 1)


def w_phases(w: torch.Tensor, phases: int) -> torch.Tensor:
    """The weight's per-phase slices stacked on dim 1: w [Bw, K, N] -> [Bw, P, K, N]
    (phases 0 and 2 read wh, 1 and 3 wl)."""
    if phases == 0:
        return w.unsqueeze(1)
    wh = _keep(w, 4)
    wl = _keep(w, 7) - wh if phases > 1 else None
    return torch.stack([wh, wl, wh, wl][:phases], 1)


# ------------------------------------------------------------------------------------------------
# 16-bit dest
# ------------------------------------------------------------------------------------------------


#: The 16-bit dest's narrowing rule: "even" (round to nearest even: the default; the ISA model
#: says only "approximately; real hardware rounds") or "away" (ties away from zero): an assumption
#: switch (engine.vocab.assumptions `dest16_round`), set with `dest16_rounding`.
_DEST16 = {"ties": "even"}


@contextlib.contextmanager
def dest16_rounding(ties: str):
    """Run the block with the 16-bit dest narrowing ties to `even` or `away` (process-wide)."""
    if ties not in ("even", "away"):
        raise ValueError(f"unknown dest16 tie rule {ties!r}; legal: even, away")
    old = _DEST16["ties"]
    _DEST16["ties"] = ties
    native.set_ties_away(ties == "away")
    try:
        yield
    finally:
        _DEST16["ties"] = old
        native.set_ties_away(old == "away")


def _to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 values (as fp32) under the current tie rule."""
    if _DEST16["ties"] == "even":
        return t.to(torch.bfloat16).float()
    bits = t.contiguous().view(torch.int32)
    special = (bits & 0x7F800000) == 0x7F800000
    return torch.where(special, bits, (bits + 0x8000) & -65536).view(torch.float32)


def dest16_torch(xs: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None, kb: int = 0) -> torch.Tensor:
    """The bf16-dest walk in torch (reference for kernels/dest16.c, bit for bit): xs [B, P, M, K]
    (`x_phases`), w [Bw, K, N] (Bw = B or 1), K a multiple of 32, init [B, M, N] or None. kb > 0:
    K blocks of kb elements with packer L1 accumulation in Float16_b (the last block reloads)."""
    B, P, M, K = xs.shape
    ws = w_phases(w, P)
    N = ws.shape[-1]
    dest = torch.zeros(B, M, N, device=xs.device) if init is None else init.clone()
    starts = list(range(0, K, kb)) if kb else [0]
    acc = None
    for t in range(0, K, TILE_K):
        if kb and t and t % kb == 0:  # a block ends
            acc = dest if acc is None else _to_bf16(acc + dest)
            dest = acc.clone() if t == starts[-1] else torch.zeros_like(dest)
        for p in range(P):
            for s in range(t, t + TILE_K, SLICE_K):
                part = xs[:, p, :, s, None] * ws[:, p, s, None, :]
                for k in range(s + 1, s + SLICE_K):
                    part = part + xs[:, p, :, k, None] * ws[:, p, k, None, :]
                dest = _to_bf16(dest + part)
    return dest


def _dest16_block(xs: torch.Tensor, ws: torch.Tensor, init: torch.Tensor | None, kb: int = 0) -> torch.Tensor:
    """xs [B, P, M, K] activation slices, ws [Bw, K, N] the raw weight; see `dest16_torch`."""
    fn = native.dest16() if xs.device.type == "cpu" else None
    if fn is None:
        return dest16_torch(xs, ws, init, kb)
    xs, ws = xs.contiguous(), ws.contiguous()
    B, P, M, K = xs.shape
    N = ws.shape[-1]
    out = torch.empty(B, M, N)
    init_p = None if init is None else init.contiguous()
    args = (xs.data_ptr(), ws.data_ptr(), None if init_p is None else init_p.data_ptr(), out.data_ptr(),
            B, P, M, K, N, int(ws.shape[0] != 1), kb)
    items = B * -(-N // 16)  # (batch, 16-column panel) work items
    n = max(1, min(torch.get_num_threads(), items))
    if n == 1:
        fn(*args, 0, items)
    else:  # ctypes releases the GIL: disjoint item ranges on n threads
        cuts = [items * i // n for i in range(n + 1)]
        list(_pool(n).map(lambda r: fn(*args, *r), zip(cuts[:-1], cuts[1:])))
    return out


@functools.lru_cache(maxsize=None)
def _pool(n: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(n, thread_name_prefix="dest16")


def _blocks(K: int, kb: int) -> list[tuple[int, int]]:
    return [(k0, min(K, k0 + kb)) for k0 in range(0, K, kb)]


def _round_to(fmt, t: torch.Tensor) -> torch.Tensor:
    """Round a partial to `fmt` (device rounding for block formats; fp32 unchanged)."""
    return formats.quantize(t, fmt, "device")


def partials_format(fid: Fidelity, n_blocks: int, out_fmt, interm=None) -> str:
    """The format K-block partials are held in (program factories' interm0_data_format): packer L1
    acc (engaged only with > 1 block) -> Float32 / Float16_b by the dest; else Float32 with an fp32
    dest, the output format with a 16-bit one. `interm` overrides it (the DRAM-sharded decode
    matmuls always use Float16_b)."""
    if interm is not None:
        return formats.get_format(interm).name
    if fid.packer_l1_acc and n_blocks > 1:
        return fid.interm_format
    return "fp32" if fid.fp32_dest else formats.get_format(out_fmt).name


def _walk(xb: torch.Tensor, wb: torch.Tensor, fid: Fidelity, kb: int, out_fmt, interm) -> torch.Tensor:
    """All K blocks (the module docstring's accumulation rules); float32 [B, M, N]."""
    K = xb.shape[-1]
    blocks = _blocks(K, kb)
    l1 = fid.packer_l1_acc and len(blocks) > 1
    part_fmt = partials_format(fid, len(blocks), out_fmt, interm)
    if fid.fp32_dest:
        pairs = _combined_pairs(xb, wb, fid.phases)
        if part_fmt == "fp32":  # fp32 partials: one fp32 sum over all of K
            blocks = [(0, K)]

        parts = iter(_block_partials(pairs, blocks)) if len(blocks) > 1 else None  # one batched matmul

        def block(k0, k1, init):
            if parts is not None:
                d = next(parts)
            else:
                (xs, ws), *rest = pairs
                d = torch.matmul(xs[..., k0:k1], ws[..., k0:k1, :])
                for xs, ws in rest:
                    d = d - torch.matmul(xs[..., k0:k1], ws[..., k0:k1, :])
            return d if init is None else init + d
    else:
        pad = (-K) % TILE_K
        xs, ws = x_phases(xb, fid.phases), wb
        if pad:  # zero slices change nothing; blocks end on the padded K
            xs = torch.nn.functional.pad(xs, (0, pad))
            ws = torch.nn.functional.pad(ws, (0, 0, 0, pad))
            blocks = [(k0, k1 + pad if k1 == K else k1) for k0, k1 in blocks]

        if part_fmt == "bf16":  # L1 acc in Float16_b, or a bf16 spill (exact reload): one kernel call
            kpad = blocks[-1][1]
            return _dest16_block(xs[..., :kpad], ws[..., :kpad, :], None, kb if l1 else 0)

        def block(k0, k1, init):
            return _dest16_block(xs[..., k0:k1], ws[..., k0:k1, :], init)

    acc = None
    for i, (k0, k1) in enumerate(blocks):
        last = i == len(blocks) - 1
        if l1 and not last:  # dest restarts at 0; the packer adds the block into L1
            d = block(k0, k1, None)
            acc = _round_to(part_fmt, d if acc is None else acc + d)
        else:  # reload the partial into dest (the last block with L1 acc; every block when spilling)
            d = block(k0, k1, acc)
            acc = d if last else _round_to(part_fmt, d)
    return acc


def _block_partials(pairs, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
    """fp32 dest: every K block's fp32 result from one batched matmul per operand pair (blocks of
    equal size; a ragged last block on its own)."""
    kb = blocks[0][1] - blocks[0][0]
    n_even = sum(1 for k0, k1 in blocks if k1 - k0 == kb)
    out = None
    for xs, ws in pairs:
        B, M, _ = xs.shape
        N = ws.shape[-1]
        xe = xs[..., : n_even * kb].reshape(B, M, n_even, kb).transpose(1, 2)  # [B, nb, M, kb]
        we = ws[..., : n_even * kb, :].reshape(ws.shape[0], n_even, kb, N)  # [Bw, nb, kb, N]
        part = torch.matmul(xe, we)  # [B, nb, M, N]
        parts = list(part.unbind(1))
        if n_even < len(blocks):
            k0, k1 = blocks[-1]
            parts.append(torch.matmul(xs[..., k0:k1], ws[..., k0:k1, :]))
        out = parts if out is None else [a - b for a, b in zip(out, parts)]
    return out


def matmul(x: torch.Tensor, w: torch.Tensor, setting, k_block: int | None = None, *, out_fmt="bf16",
           interm=None) -> torch.Tensor:
    """x [..., M, K] (activation, SrcB) @ w [K, N] or [..., K, N] (weight, SrcA) as the matrix
    engine computes it under `setting` (a name or `Fidelity`); float32 result [..., M, N].

    `k_block` (elements, a multiple of 32; None = all of K in one block) is tt-metal's
    in0_block_w x 32; `out_fmt` is the op's output format (where partials spill without packer L1
    accumulation and a 16-bit dest); `interm` overrides the partials' format. See the module
    docstring.
    """
    fid = resolve(setting)
    x = torch.as_tensor(x).detach().to(torch.float32)
    w = torch.as_tensor(w).detach().to(torch.float32)
    if x.dim() < 1 or w.dim() < 2 or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"matmul needs x [..., M, K] and w [..., K, N]; got {tuple(x.shape)} and {tuple(w.shape)}")
    K, N = w.shape[-2:]
    if k_block is not None and (int(k_block) <= 0 or int(k_block) % TILE_K):
        raise ValueError(f"k_block must be a positive multiple of {TILE_K}, got {k_block!r}")
    kb = max(K, 1) if k_block is None else int(k_block)
    if fid.phases == 0 and fid.fp32_dest:  # the emulator's exact mode: plain fp32
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
    return _walk(xb, wb, fid, kb, out_fmt, interm).reshape(out_shape)


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


# SiLU as the SFPU computes it (ckernel_sfpu_silu.h). `sfpu-piecewise` is the seed era's:
# silu(x) = x * s(|x|) (x >= 0) or x * (1 - s(|x|)) (x < 0), s(t) = 0.229 t + 0.5 for t <= 1,
# a degree-4 polynomial for 1 < t < 5, 1 from 5 (max sigmoid error 0.0087); `exact` is x * sigmoid(x)
# (later tt-metal computes sigmoid from exp).
_SIGMOID_POLY = (0.00144462, -0.01055479, -0.01203685, 0.24300185, 0.50437757)  # POLYVAL5 c4..c0


def silu_piecewise(x: torch.Tensor) -> torch.Tensor:
    """The seed era's SFPU SiLU (`_calculate_silu_` / `_sigmoid_piecewise_linear_positive_`) in fp32."""
    x = torch.as_tensor(x).to(torch.float32)
    t = x.abs()
    poly = torch.full_like(t, _SIGMOID_POLY[0])
    for c in _SIGMOID_POLY[1:]:
        poly = poly * t + c
    s = torch.where(t <= 1.0, 0.229 * t + 0.5, torch.where(t < 5.0, poly, torch.ones_like(t)))
    return x * torch.where(x < 0, 1.0 - s, s)


SILU = dict(zip(SILU_MODES, (torch.nn.functional.silu, silu_piecewise), strict=True))


def silu_fn(mode: str):
    """The SiLU of a `numerics.silu` mode name."""
    try:
        return SILU[mode]
    except KeyError:
        raise ValueError(f"unknown silu mode {mode!r}; legal modes: {', '.join(SILU)}") from None
