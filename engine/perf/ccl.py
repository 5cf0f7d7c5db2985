"""The collectives tt_transformers issues per decoder layer, per topology, and what each costs.

`layer_plan(...)` lists the collectives of one decoder layer in decode or prefill for a replica
layout, read from tt_transformers (tenstorrent/tt-metal, models/tt_transformers/tt/):

* 1-D meshes (N300 line, T3K ring; `ccl.py` `tt_all_reduce`: "N300 and T3K: reduce_scatter"):
  the residual stream stays fractured (hidden / n per chip). Each norm first all-gathers it
  (`distributed_norm.py`, 1 link; with hidden >= 8192 in prefill the norm is distributed: a
  statistics all-gather, then the output all-gather). qkv and w1/w3 are column parallel (their
  `tt_all_reduce(cluster_axis=1)` is a no-op on a 1 x n mesh). wo is row parallel and
  reduce-scattered, except on a ring when (hidden / 32 / n) % n == 0, where wo runs as one fused
  all-gather + matmul (`USE_FUSED_ALL_GATHER_MATMUL`, attention.py decode). w2 is row parallel and
  reduce-scattered (mlp.py). 4 collectives per layer.
* TG, an 8 x 4 mesh (axis 0: 8 chips, 4 links; axis 1: 4 chips, 3 links; ccl dtype bfp8):
  norms are distributed (a statistics all-gather along axis 1); qkv all-reduces along axis 1
  (all-gather + local reduce); the attention output is all-gathered along axis 1 (2 links); wo
  and w2 all-reduce along axis 0 (reduce-scatter + all-gather when hidden == 8192, all-gather +
  local reduce otherwise); w1 and w3 are reduce-scattered along axis 1 and their product
  all-gathered (2 links) when hidden == 8192 or in prefill, else each is all-reduced.

`cost(c, ...)` prices one collective: a fixed cost per launch (program, semaphores, fabric
handshake), a per-step latency times the steps the farthest shard travels, and the bytes the
busiest link direction carries over `links` x the per-link payload bandwidth. Hand counts:

    kind            steps (line / ring)      bytes on the busiest link direction
    all_gather      n-1 / ceil((n-1)/2)      (n-1)/n * P  /  ceil((n-1)/2)/n * P
    reduce_scatter  same as all_gather       same as all_gather
    all_reduce      n-1 / ceil((n-1)/2)      (n-1) * P (line) / ceil((n-1)/2) * P (ring):
                    (all-gather of whole partials, then a local reduce)
    all_reduce_rs_ag  reduce_scatter + all_gather of P
    all_gather_matmul  as all_gather of the matmul input (the matmul itself is costed as a matmul)

where P is the full tensor on one chip (the gathered output, or the partial-sum input of a
reduction) and n the chips along the axis.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.vocab import formats
from engine.vocab.devices import Replica

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_reduce_rs_ag", "all_gather_matmul")
BF16, BFP8 = formats.bytes_per_element("bf16"), formats.bytes_per_element("bfp8")


@dataclass(frozen=True)
class Collective:
    name: str  # where in the layer (e.g. "wo.reduce_scatter")
    kind: str  # one of KINDS
    n: int  # chips along the axis
    links: int
    ring: bool
    payload: float  # bytes: the full tensor on one chip (see module docstring)
    count: float = 1.0  # issued this many times per layer (per step for model-level ones)
    axis: int | None = None  # mesh axis on TG

    def to_dict(self) -> dict:
        return asdict(self)


def steps(kind: str, n: int, ring: bool) -> int:
    """Steps the farthest shard travels (each one a hop plus a handshake)."""
    if n <= 1:
        return 0
    one = math.ceil((n - 1) / 2) if ring else n - 1
    return 2 * one if kind == "all_reduce_rs_ag" else one


def wire_bytes(kind: str, n: int, ring: bool, payload: float) -> float:
    """Bytes carried by the busiest link direction."""
    if n <= 1:
        return 0.0
    per_shard_hops = math.ceil((n - 1) / 2) if ring else n - 1
    if kind == "all_reduce":  # every chip's whole partial reaches every other chip
        return per_shard_hops * payload
    one = per_shard_hops / n * payload
    return 2 * one if kind == "all_reduce_rs_ag" else one


def cost(c: Collective, fixed_us: float, step_us: float, link_bytes_per_us: float) -> tuple[float, float, float]:
    """(data us, step latency us, launch us) of one issue of collective `c`: the bytes of the
    busiest link direction over `links` links, `step_us` per step, `fixed_us` per launch (two for
    a reduce-scatter + all-gather pair)."""
    if c.n <= 1:
        return 0.0, 0.0, 0.0
    data = wire_bytes(c.kind, c.n, c.ring, c.payload) / (max(1, c.links) * link_bytes_per_us)
    launches = 2 if c.kind == "all_reduce_rs_ag" else 1
    return data, steps(c.kind, c.n, c.ring) * step_us, launches * fixed_us


def fused_wo(rep: Replica, hidden: int) -> bool:
    """tt_transformers fuses wo with its all-gather on a ring when (hidden/32/n) % n == 0."""
    n = rep.tp
    return rep.layout == "ring" and n > 1 and (hidden // 32 // n) % n == 0


def layer_plan(rep: Replica, *, hidden: int, attn_width: int, qkv_out: int, intermediate: int,
               rows: int, phase: str) -> list[Collective]:
    """The collectives of one decoder layer (see the module docstring for the sources)."""
    if rep.layout == "single":
        return []
    if rep.layout == "mesh2d":
        return _mesh2d_plan(rep, hidden, attn_width, qkv_out, intermediate, rows, phase)
    n, ring, links = rep.tp, rep.layout == "ring", rep.links[1]
    full = rows * hidden * BF16

    def norm(name: str) -> list[Collective]:
        out = []
        if phase == "prefill" and hidden >= 8192:  # distributed norm: statistics, then the output
            out.append(Collective(f"{name}.stats_all_gather", "all_gather", n, 1, ring, rows * 32 * n * BF16))
        return out + [Collective(f"{name}.all_gather", "all_gather", n, 1, ring, full)]

    if phase == "decode" and fused_wo(rep, hidden):
        wo = Collective("wo.all_gather_matmul", "all_gather_matmul", n, 1, ring, rows * attn_width * BF16)
    else:
        wo = Collective("wo.reduce_scatter", "reduce_scatter", n, links, ring, full)
    return [*norm("attn_norm"), wo, *norm("ff_norm"), Collective("w2.reduce_scatter", "reduce_scatter", n, links, ring, full)]


def _mesh2d_plan(rep: Replica, hidden: int, attn_width: int, qkv_out: int, intermediate: int,
                 rows: int, phase: str) -> list[Collective]:
    rows_n, cols_n = rep.mesh  # axis 0 (8 chips), axis 1 (4 chips)
    l0, l1 = rep.links
    h_loc = hidden / cols_n  # residual fractured over the 4-chip axis
    big = hidden >= 8192
    ar0 = "all_reduce_rs_ag" if big else "all_reduce"
    stats = rows * 32 * cols_n * BF16
    ff_loc = rows * intermediate / rows_n * BFP8
    plan = [
        Collective("attn_norm.stats_all_gather", "all_gather", cols_n, l1, False, stats, axis=1),
        Collective("qkv.all_reduce", "all_reduce", cols_n, l1, False, rows * qkv_out / rows_n * BFP8, axis=1),
        Collective("attn_out.all_gather", "all_gather", cols_n, 2, False, rows * attn_width / rows_n * BF16, axis=1),
        Collective("wo.all_reduce", ar0, rows_n, l0, False, rows * h_loc * BFP8, axis=0),
        Collective("ff_norm.stats_all_gather", "all_gather", cols_n, l1, False, stats, axis=1),
    ]
    if big or phase == "prefill":
        plan += [Collective("w1_w3.reduce_scatter", "reduce_scatter", cols_n, l1, False, ff_loc, count=2, axis=1),
                 Collective("w2_in.all_gather", "all_gather", cols_n, 2, False, ff_loc, axis=1)]
    else:
        plan += [Collective("w1_w3.all_reduce", "all_reduce", cols_n, l1, False, ff_loc, count=2, axis=1)]
    plan.append(Collective("w2.all_reduce", ar0, rows_n, l0, False, rows * h_loc * BFP8, axis=0))
    return plan


def model_plan(rep: Replica, *, hidden: int, vocab: int, rows: int) -> list[Collective]:
    """Collectives once per step outside the decoder layers: the final norm's gather (1-D), its
    statistics gather and the LM head's all-reduce of partial logits (TG)."""
    if rep.layout == "single":
        return []
    if rep.layout == "mesh2d":
        rows_n, cols_n = rep.mesh
        return [Collective("norm.stats_all_gather", "all_gather", cols_n, rep.links[1], False, rows * 32 * cols_n * BF16, axis=1),
                Collective("lm_head.all_reduce", "all_reduce", cols_n, rep.links[1], False, rows * vocab / rows_n * BF16, axis=1)]
    return [Collective("norm.all_gather", "all_gather", rep.tp, 1, rep.layout == "ring", rows * hidden * BF16)]
