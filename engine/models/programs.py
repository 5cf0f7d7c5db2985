"""tt_transformers' matmul program configs, reduced to what the numerics need: the K block of each
linear (`in0_block_w` tiles x 32 elements) per model, tensor-parallel width and mode, and how a
tensor-parallel replica splits wo and w2 along K.

The formulas are tt_transformers' `ModelArgs` helpers (models/tt_transformers/tt/model_config.py:
`find_largest_divisor`, `find_grid`, `find_grid_k_n`, `find_prefill_grid`, `dram_matmul_config`,
`matmul_config`, and the program configs XQKV_DECODE_PROGCFG, ATTN_OUTPUT_PROGCFG,
DECODE_MLP_W1_W3 / W2_PRG_CONFIG, XQKV_PREFILL_PROGCFG, WO_PREFILL_PROGCFG, PREFILL_MLP_W1_W3 /
W2_PRG_CONFIG, the LM head's dram_matmul_config over `lm_head_core_grid`) on the compute grid of
the chip whose numerics are emulated (engine.vocab.devices.numerics_chip: Wormhole's 8x8).
`blocks(spec, tp, prefill)` gives K-block sizes in elements for the model's linears; None where K
is not whole tiles (the tiny test models' 16-wide heads): one block.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.models.spec import ModelSpec
from engine.vocab.devices import emulated_devices, numerics_chip

TILE = 32
GRID = numerics_chip().grid  # compute grid (rows, cols), from the device table


class Unsupported(ValueError):
    """tt_transformers cannot lay this model out on this many chips (its own asserts)."""


def largest_divisor(n: int, max_divisor: int = 8) -> int:
    """`find_largest_divisor`: the largest i <= max_divisor dividing n (1 if none)."""
    return next((i for i in range(max_divisor, 0, -1) if n % i == 0), 1)


def _rows_cols(cores: int) -> tuple[int, int] | None:
    for rows in range(1, GRID[0] + 1):
        if cores % rows == 0 and cores // rows <= GRID[1]:
            return rows, cores // rows
    return None


def find_grid(n_tiles: int) -> tuple[int, int]:
    """`find_grid`: core counts dividing n_tiles, closest to 32 first, as (rows, cols)."""
    for cores in sorted((c for c in range(1, GRID[0] * GRID[1] + 1) if n_tiles % c == 0), key=lambda c: abs(c - 32)):
        if (rc := _rows_cols(cores)) is not None:
            return rc
    raise Unsupported(f"no core grid for {n_tiles} tiles")


def find_grid_k_n(k_tiles: int, n_tiles: int) -> tuple[int, int]:
    """`find_grid_k_n`: the most cores (<= 64) dividing both K and N tiles, as (rows, cols)."""
    for cores in sorted((c for c in range(1, GRID[0] * GRID[1] + 1) if k_tiles % c == 0 and n_tiles % c == 0), reverse=True):
        if (rc := _rows_cols(cores)) is not None:
            return rc
    raise Unsupported(f"no core grid for K={k_tiles}, N={n_tiles} tiles")


def find_prefill_grid(row_tiles: int, col_tiles: int) -> tuple[int, int]:
    """`find_prefill_grid`: (largest rows <= 8 dividing row_tiles, largest cols <= 8 dividing col_tiles)."""
    return largest_divisor(row_tiles, GRID[0]), largest_divisor(col_tiles, GRID[1])


def dram_in0_block_w(k: int, cores: int) -> int:
    """`dram_matmul_config`'s in0_block_w for K = k elements over `cores` cores."""
    return largest_divisor(k // (TILE * cores))


def matmul_in0_block_w(k: int, grid: tuple[int, int]) -> int:
    """`matmul_config`'s in0_block_w: K tiles over the grid's second entry."""
    return largest_divisor(k // (TILE * grid[1]))


def lm_head_cores(dim: int) -> int:
    """`lm_head_core_grid`: from the full grid, fewer rows (then fewer columns) until it divides dim / 32."""
    rows, cols = GRID
    while dim % (TILE * rows * cols):
        rows -= 1
        if rows == 0:
            cols, rows = cols - 1, GRID[0]
    return rows * cols


@dataclass(frozen=True)
class Blocks:
    """K-block size in elements of each linear of one mode (None = one block: K not whole tiles)."""

    qkv: int | None
    wo: int | None
    w13: int | None
    w2: int | None
    lm_head: int | None


def wo_fused(spec: ModelSpec, tp: int, topology: str) -> bool:
    """USE_FUSED_ALL_GATHER_MATMUL: on a ring (T3K) with (dim / 32 / tp) % tp == 0 the attention output
    is all-gathered and wo split along N (no K split); otherwise wo is split along K."""
    return topology == "ring" and tp > 1 and (spec.hidden // TILE // tp) % tp == 0


def check_tp(spec: ModelSpec, tp: int) -> None:
    """tt_transformers' layout asserts for a tp-chip replica (heads and the MLP split evenly)."""
    if tp == 1:
        return
    bad = [f"{what} {n}" for what, n in (("attention heads", spec.n_heads), ("KV heads", spec.n_kv_heads),
                                          ("MLP hidden size", spec.intermediate)) if n % tp]
    if bad:
        raise Unsupported(f"tt_transformers cannot split {spec.name} over {tp} chips ({', '.join(bad)} not divisible "
                          f"by {tp}); evaluate it on {emulated_devices()[0]} (1 chip)")


def blocks(spec: ModelSpec, tp: int = 1, prefill: bool = False, topology: str = "line") -> Blocks:
    """K blocks per linear for a tp-chip replica (per chip: wo's and w2's K are the chip's share)."""
    check_tp(spec, tp)
    dim, hidden = spec.hidden, spec.intermediate
    attn = spec.n_heads * spec.head_dim
    fused = wo_fused(spec, tp, topology)
    wo_k = attn if fused else attn // tp
    tiles = all(v % TILE == 0 for v in (dim, hidden // tp, wo_k))

    def kb(in0: int) -> int | None:
        return in0 * TILE if tiles else None

    lm = kb(dram_in0_block_w(dim, lm_head_cores(dim))) if dim % TILE == 0 else None
    if not tiles:
        return Blocks(None, None, None, None, lm)
    if prefill:
        return Blocks(
            qkv=kb(1),  # XQKV_PREFILL_PROGCFG: in0_block_w=1
            # prefill runs no all-gather-matmul: wo's K is the chip's attention width even on a fused ring
            wo=kb(matmul_in0_block_w(attn // tp, find_prefill_grid(8, attn // tp // TILE))),
            w13=kb(matmul_in0_block_w(dim, find_prefill_grid(8, dim // TILE))),
            w2=kb(matmul_in0_block_w(hidden, find_prefill_grid(8, hidden // TILE))),  # full hidden, as tt passes it
            lm_head=lm,
        )
    wo = dim // TILE // 8 if fused else dram_in0_block_w(wo_k, spec.n_heads // tp)  # ATTN_ALL_GATHER_MATMUL / ATTN_OUTPUT
    return Blocks(
        qkv=kb(dram_in0_block_w(dim, _cores(find_grid(dim // TILE)))),
        wo=kb(wo),
        w13=kb(dram_in0_block_w(dim, _cores(find_grid_k_n(dim // TILE, hidden // tp // TILE)))),
        w2=kb(dram_in0_block_w(hidden // tp, _cores(find_grid_k_n(hidden // tp // TILE, dim // TILE)))),
        lm_head=lm,
    )


def _cores(grid: tuple[int, int]) -> int:
    return grid[0] * grid[1]
