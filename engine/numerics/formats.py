"""Wormhole number formats as data: fp32, bf16 and the block floating point Bfp8_b / Bfp4_b.

Formats are `Format` records (`FORMATS`); the ops (`quantize`, `pack`, `unpack`,
`bytes_per_element`) take a format name or record. Everything works on int32 bit patterns with
vectorised torch ops, no Python loop per block.

Block formats (docs/NUMERICS.md). A block is 16 consecutive elements along the LAST
dimension; a last dimension that is not a multiple of 16 is padded with zeros (a zero has
exponent 0, so padding never changes a block's exponent). The block's shared exponent E is the
largest biased fp32 exponent field among its elements; each element keeps a sign and an
unnormalised magnitude m (7 bits for bfp8, 3 for bfp4): value = m / 2^6 * 2^(E-127) for bfp8,
m / 2^2 * 2^(E-127) for bfp4.

Rounding modes for the block formats:

* ``"host"`` - tt-metal's host conversion (how weights are made), bit for bit: restore the hidden
  one, shift right by (E - e) dropping the shifted-out bits (no sticky bit), round the top 7 / 3
  bits to nearest with ties to even on the remaining bits, saturate at 127 / 7 (no exponent
  bump); a magnitude that rounds to 0 gets sign 0. An element whose exponent field is 0 (zero or
  an fp32 denormal) encodes as 0, as in tt-metal's current `pack_tiles` (older versions only
  special-cased +-0); it still counts as exponent 0 for the shared exponent.
* ``"device"`` - the packer (how activations and the KV cache are written): denormals flush to
  zero, the same truncating alignment shift, then round to nearest with ties AWAY from zero;
  bfp4 is made by rounding to bfp8 first and then truncating the bottom 4 magnitude bits.

NaN/Inf get no special case (as on the host): they have exponent 255, so their block's other
elements mostly become 0 and the element itself decodes to +-inf.

Decoding returns float32 values m * 2^(E-133) (bfp8) or m * 2^(E-129) (bfp4), exact (blocks with
a tiny E decode to fp32 denormals; quantize is idempotent for blocks whose values stay normal).

bf16 rounds to nearest even in both rounding modes; fp32 is the identity.

Tile byte layout (`pack` / `unpack`): a 2-D tensor (leading dims flattened into rows, a 1-D
tensor is one row) is zero-padded to multiples of 32 in both dims and cut into 32x32 tiles,
stored in row-major order of the tile grid. Each tile holds four 16x16 faces: face 0 = rows 0-15
cols 0-15, face 1 = rows 0-15 cols 16-31, face 2 = rows 16-31 cols 0-15, face 3 = rows 16-31
cols 16-31. A bfp tile is 64 exponent bytes (one per face row, in face order then row order:
byte 16*f + i is face f row i), then the faces one after another, each row-major:
bfp8 one sign-magnitude byte per element (sign bit 7, magnitude bits 0-6) -> 1088 bytes;
bfp4 one nibble per element (sign bit 3, magnitude bits 0-2), two per byte with the LOWER-index
element in the LOW nibble -> 576 bytes. bf16 / fp32 tiles are the faces of little-endian
values (2048 / 4096 bytes), no exponent section.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from engine.vocab.formats import BLOCK, FACE, FORMATS, ROUNDINGS, TILE, Format, bytes_per_element, get_format  # noqa: F401 (the table; re-exported for the ops' callers)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; legal roundings: {', '.join(ROUNDINGS)}")


def _as_f32(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _encode_blocks(x: torch.Tensor, fmt: Format, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode float32 `x` of shape [..., n*16] into (E int32 [..., n], signed magnitude int32
    [..., n, 16]); a zero magnitude is +0 (sign 0)."""
    bits = x.contiguous().view(torch.int32).reshape(*x.shape[:-1], -1, BLOCK)
    e = (bits >> 23) & 0xFF
    shared = e.amax(-1)
    d = shared.unsqueeze(-1) - e
    d.clamp_(max=31)  # 24-bit significand >> 24..31 is 0; avoid shifts past the word
    sig = (bits & 0x7FFFFF) | 0x800000  # restore the hidden one
    sig >>= d  # align to the shared exponent, dropping the shifted-out bits
    del d
    if rounding == "host":
        s = 24 - fmt.mag_bits  # bits below the kept magnitude
        # round to nearest, ties to even: add (half - 1 + lsb) then shift
        q = sig + (((sig >> s) & 1) + ((1 << (s - 1)) - 1))
        q >>= s
        q.clamp_(max=fmt.max_mag)
    else:  # device: round to bfp8 with ties away from zero; bfp4 truncates that
        sig += 1 << 16
        q = sig
        q >>= 17
        q.clamp_(max=127)
        if fmt.mag_bits != 7:
            q >>= 7 - fmt.mag_bits
    q.masked_fill_(e == 0, 0)  # zero and denormal inputs encode as 0
    q = torch.where(bits < 0, -q, q)  # -0 stays 0: a zero magnitude gets sign 0
    return shared, q


def _scale(shared: torch.Tensor, fmt: Format) -> torch.Tensor:
    """2^(E-127-frac_shift) as float32 (exact, possibly denormal) for int32 exponents E."""
    k = shared - (127 + fmt.frac_shift)  # the unbiased exponent of one magnitude unit
    normal = ((k + 127).clamp(min=1) << 23)
    denormal = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, denormal).view(torch.float32)


def _decode_blocks(shared: torch.Tensor, q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Inverse of `_encode_blocks`: float32 [..., n*16]."""
    out = q.to(torch.float32) * _scale(shared, fmt).unsqueeze(-1)
    return out.reshape(*q.shape[:-2], -1)


_MAGIC = 1.5 * 2.0**23  # (y + M) - M rounds |y| < 2^22 to an integer, ties to even, zero to +0


def _fast_blocks(xb: torch.Tensor, fmt: Format, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize blocks [nb, 16] with float ops (a few passes, the fast path).

    Same arithmetic as `_encode_blocks`: |x| * 2^(150-E) is the hidden-one significand already
    shifted right by E - e, so trunc() of it (toward zero, sign kept) is the bit-dropping shift;
    the rounding then works on that integer / 2^(24-bits).
    Exact for blocks with E == 0 or 24 <= E <= 254 (zeros and denormals then give |t| < 1);
    returns (values, special) where `special` marks the blocks the caller must redo on the integer
    path (0 < E < 24, where 2^(150-E) overflows, and E == 255, Inf/NaN).
    """
    lo, hi = torch.aminmax(xb, dim=-1)
    amax = torch.maximum(hi, -lo)
    shared = (amax.view(torch.int32) >> 23) & 0xFF
    special = ((shared > 0) & (shared < 24)) | (shared == 255) | amax.isnan()
    align = ((277 - shared.clamp(24, 254)) << 23).view(torch.float32).unsqueeze(-1)  # 2^(150-E)
    t = xb * align
    t.trunc_()
    if rounding == "host":
        t.mul_(2.0 ** -(24 - fmt.mag_bits)).add_(_MAGIC).sub_(_MAGIC)  # ties to even, -0 -> +0
        t.clamp_(-fmt.max_mag, fmt.max_mag)
    else:
        t.add_(torch.sign(xb), alpha=2.0**16).mul_(2.0**-17).trunc_()  # bfp8, ties away from zero
        t.clamp_(-127, 127)
        if fmt.mag_bits != 7:
            t.mul_(2.0 ** -(7 - fmt.mag_bits)).trunc_()  # bfp4: truncate the bfp8 magnitude
    t.mul_(_scale(shared, fmt).unsqueeze(-1))
    if rounding != "host":
        t.add_(0.0)  # a zero magnitude has sign 0: -0 -> +0
    return t, special


def quantize(x: torch.Tensor, fmt: str | Format, rounding: str = "host", gasket_ties: str = "away") -> torch.Tensor:
    """Round `x` to the values format `fmt` can represent; same shape, float32.

    `rounding` selects tt-metal's host conversion ("host", for weights), the on-device packer's
    single rounding ("device": typecast, the KV cache fill) or its double rounding ("packer":
    compute ops writing bfp8 without bfp8_pack_precise; `gasket` then "device"); see the module
    docstring. Blocks of 16 run along
    the last dimension. A 2048 x 8192 tensor takes about 0.1 s on two cores.
    """
    f = get_format(fmt)
    _check_rounding(rounding)
    x = _as_f32(x)
    if f.name == "fp32":
        return x.clone()
    if f.name == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    shape = x.shape
    n = shape[-1] if shape else 1
    xp = _pad_last(x.reshape(1) if x.dim() == 0 else x, BLOCK)
    xb = xp.reshape(-1, BLOCK)
    if rounding == "packer":  # the gasket's rounding first, then the device's alignment rounding
        xb, rounding = gasket(xb, gasket_ties), "device"
    out, special = _fast_blocks(xb, f, rounding)
    if special.any():  # rare: tiny blocks or Inf/NaN, redone bit for bit on the integer path
        idx = special.nonzero().squeeze(-1)
        shared, q = _encode_blocks(xb[idx], f, rounding)
        out[idx] = _decode_blocks(shared, q, f)
    out = out.reshape(xp.shape)
    if out.shape[-1] != n:
        out = out[..., :n]
    return out.reshape(shape).contiguous()


def gasket(xb: torch.Tensor, ties: str = "away") -> torch.Tensor:
    """The packer's first stage for a Bfp8_b / Bfp4_b output whose pack_src_format is the block
    format (no `bfp8_pack_precise`), on blocks [nb, 16]: each element rounded on its own to a 7-bit
    significand (the hidden one and 6 fraction bits), to nearest with ties away from zero, or to
    even with `ties="even"` (*assumption*: this stage's tie rule is not documented; the default
    ties away as the second stage does; engine.vocab.assumptions `gasket_ties`). The
    shared exponent is the unrounded block's: an element the rounding carries past it saturates at
    127 units (silicon, issue 52155: the double-rounding error is at most 1.5x the single one, which
    an exponent bump would exceed). Zero and denormals unchanged (the second stage flushes them).
    tt-metal PR 14822 / issue 52155 (docs/NUMERICS.md)."""
    bits = xb.contiguous().view(torch.int32)
    e = (bits >> 23) & 0xFF
    mag = bits & 0x7FFFFFFF
    if ties == "even":
        mag = mag + (((mag >> 17) & 1) + ((1 << 16) - 1))
    elif ties == "away":
        mag = mag + (1 << 16)
    else:
        raise ValueError(f"unknown gasket tie rule {ties!r}; legal: away, even")
    mag &= ~((1 << 17) - 1)
    shared = e.amax(-1, keepdim=True)
    top = ((shared << 23) | 0x7E0000)  # 127 units of the shared exponent: 1.111111b * 2^(E-127)
    mag = torch.minimum(mag, top)
    out = torch.where(e != 0, mag | (bits & ~0x7FFFFFFF), bits)
    return out.view(torch.float32)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """Leading dims flatten into rows; a 0-d or 1-d tensor is one row."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def _rows_cols(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    return math.prod(shape[:-1]), shape[-1]


def _to_faces(x2: torch.Tensor) -> torch.Tensor:
    """[R, C] (multiples of 32) -> [tiles, 4 faces, 16, 16] in tile-grid row-major, face order."""
    r, c = x2.shape
    t = x2.reshape(r // TILE, 2, FACE, c // TILE, 2, FACE)  # (tr, fr, i, tc, fc, j)
    return t.permute(0, 3, 1, 4, 2, 5).reshape(-1, 4, FACE, FACE)


def _from_faces(faces: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """Inverse of `_to_faces` for padded sizes r, c."""
    t = faces.reshape(r // TILE, c // TILE, 2, 2, FACE, FACE)  # (tr, tc, fr, fc, i, j)
    return t.permute(0, 2, 4, 1, 3, 5).reshape(r, c)


def pack(x: torch.Tensor, fmt: str | Format) -> np.ndarray:
    """The tile byte image of `x` in format `fmt` (host rounding), as a flat numpy uint8 array.

    Layout in the module docstring. `unpack(pack(x, f), f, x.shape)` equals `quantize(x, f, "host")`
    bit for bit.
    """
    f = get_format(fmt)
    x2 = _as_rows(_as_f32(x))
    r, c = x2.shape
    rp, cp = -(-r // TILE) * TILE, -(-c // TILE) * TILE
    x2 = torch.nn.functional.pad(x2, (0, cp - c, 0, rp - r))
    faces = _to_faces(x2)  # [T, 4, 16, 16]
    ntiles = faces.shape[0]
    if not f.is_block:
        if f.name == "bf16":
            data = faces.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
        else:
            data = faces.contiguous().numpy().astype("<f4")
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    shared, q = _encode_blocks(faces, f, "host")  # shared [T, 4, 16], q [T, 4, 16, 16]
    exps = shared.to(torch.uint8).reshape(ntiles, 64)
    sign = (q < 0).to(torch.int32) << (f.mag_bits)
    code = (sign | q.abs()).reshape(ntiles, 1024)
    if f.name == "bfp4":
        pairs = code.reshape(ntiles, 512, 2)
        code = pairs[..., 0] | (pairs[..., 1] << 4)
    tiles = torch.cat([exps, code.to(torch.uint8)], dim=1)
    return tiles.reshape(-1).numpy()


def unpack(buf, fmt: str | Format, shape) -> torch.Tensor:
    """Decode a tile byte image made by `pack` back into a float32 tensor of `shape`."""
    f = get_format(fmt)
    shape = torch.Size(shape)
    r, c = _rows_cols(shape)
    rp, cp = -(-r // TILE) * TILE, -(-c // TILE) * TILE
    ntiles = (rp // TILE) * (cp // TILE)
    raw = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if raw.size != ntiles * f.tile_bytes:
        raise ValueError(
            f"buffer holds {raw.size} bytes; shape {tuple(shape)} in {f.name} needs {ntiles} tiles "
            f"of {f.tile_bytes} bytes = {ntiles * f.tile_bytes}"
        )
    if f.name == "bf16":
        vals = torch.from_numpy(raw.view("<i2").astype(np.int16)).view(torch.bfloat16).to(torch.float32)
        faces = vals.reshape(ntiles, 4, FACE, FACE)
    elif f.name == "fp32":
        faces = torch.from_numpy(raw.view("<f4").astype(np.float32)).reshape(ntiles, 4, FACE, FACE)
    else:
        tiles = torch.from_numpy(raw.reshape(ntiles, f.tile_bytes).copy()).to(torch.int32)
        shared = tiles[:, :64].reshape(ntiles, 4, FACE)
        code = tiles[:, 64:]
        if f.name == "bfp4":
            code = torch.stack([code & 0xF, code >> 4], dim=-1)
        code = code.reshape(ntiles, 4, FACE, FACE)
        mag = code & f.max_mag
        q = torch.where((code >> f.mag_bits) & 1 == 1, -mag, mag)
        faces = _decode_blocks(shared, q, f).reshape(ntiles, 4, FACE, FACE)
    return _from_faces(faces, rp, cp)[:r, :c].reshape(shape).contiguous()
