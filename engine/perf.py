"""Analytic performance model for Llama-family decoders on Tenstorrent Wormhole systems.

`predict(model, device, config)` returns decode speed (tokens/s/user) and time to first token
(ms) from first principles (tt-numerics.md sections 5 and 7), with every op's share in
`PerfResult.breakdown`.

Decode (one step: every user of the replica advances one token). Per decoder layer, each op:

    time = max(DRAM time, compute time) + per-op dispatch overhead

* matmuls (qkv, wo, w1+w3, w2): weights are read once per step in their storage format
  (bfp4 0.5625, bfp8 1.0625, bf16 2 bytes/element) at `dram_eff` x 288 GB/s per chip; compute pads
  the decode rows to 32 (batch 1..32 cost the same): 1 x K/32 x N/32 tiles, 16 cycles per tile per
  fidelity phase (LoFi 1, HiFi2 2, HiFi3 3, HiFi4 4), on the 12 DRAM-bank worker cores of a
  DRAM-sharded matmul, at `compute_eff` of peak;
* SDPA decode: reads each user's K and V cache up to the current position in the kv_cache format
  (an interleaved paged cache: at `kv_dram_eff` of the DRAM spec),
  computes Q.K^T and P.V with the query heads of one kv head padded to a 32-row tile, plus
  `softmax_cycles` of vector-unit work per 32x32 score tile, over all 64 cores; plus
  `user_layer_us` per user of bookkeeping (cache update, per-user reductions), shared by the
  chips that hold the user's kv heads;
* KV-cache update, norms, rotary, head reshapes, residual adds and SiLU*w3: dispatch + bytes;
* tensor-parallel collectives (below); LM head (bfp8 weights, HiFi2) once per step;
* per step: `token_us` (host loop, trace launch, output readback) + `user_step_us` per user of
  the replica (sampling and per-user output handling, done by each replica in parallel).

Prefill (TTFT) of one prompt of T tokens: compute-bound at long T and weight-streaming /
dispatch-bound at short T. Matmul tiles ceil(T/32) x K/32 x N/32 at the op's prefill fidelity over
64 cores; weights re-read per 1024-row block (tt_transformers' Wormhole prefill cut-off) at
`prefill_dram_eff` (the 2-D multicast program reads through one core per column); causal
attention ~ T^2/2 score tiles per head (Q.K^T + P.V at sdpa_prefill fidelity + softmax); activation
traffic of every op; `prefill_op_us` per op (prefill is not traced). TTFT = prefill time of one
prompt; a batch of B prompts is prefilled one after the other and its average TTFT adds
(B-1)/B x `prefill_user_ms` (the batched-prefill loop's per-prompt host work).

Multi-chip (devices.py): tensor parallel splits every weight and the heads over the replica's
chips; a 1-D line (N300) or ring (T3K) all-reduces (reduce-scatter + all-gather) the layer output
after wo and after w2; the Galaxy (TG) 2-D shards every matmul (K over one mesh axis, N over the
other) and all-reduces after each along its K axis. A collective over n chips with L links moves
(n-1)/n of the payload over L x 12 GB/s x `eth_eff` (a bidirectional ring moves half per
direction) plus one 0.7 us hop per step, plus its dispatch. DP=N runs N replicas of chips/N chips.

The global parameters are fitted by `engine.calibrate` on the N150 and N300 rows of the seed's
tables and live in `engine/data/perf_params.json`; the T3K and TG rows are never used to fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.config import Config, FidelitySetting, ModelConfig, Precision, resolve
from engine.devices import Replica, device_for
from engine.shapes import ModelShape, shape_for

PARAMS_FILE = Path(__file__).resolve().parent / "data" / "perf_params.json"

PHASES = {
    FidelitySetting.LOFI: 1,
    FidelitySetting.HIFI2: 2,
    FidelitySetting.HIFI2_NA: 2,
    FidelitySetting.HIFI2_FP16: 2,
    FidelitySetting.HIFI3: 3,
    FidelitySetting.HIFI4: 4,
    FidelitySetting.HIFI4_FP32: 4,
    FidelitySetting.EXACT: 4,  # emulator-only reference: costed as HiFi4
}

PREFILL_BLOCK_ROWS = 1024  # tt_transformers' Wormhole prefill_len_cutoff: weights re-read per block
ELTWISE_OPS = ("attn_norm", "create_heads", "rotary", "concat_heads", "residual_1", "ff_norm", "silu_mul", "residual_2")
OPS = ("qkv", "sdpa", "kv_cache", "wo", "ff1_3", "ff2", "eltwise", "ccl", "lm_head", "embed_norm_sample", "host")


@dataclass(frozen=True)
class Params:
    """Global efficiency parameters (one set for every model, device and config)."""

    dram_eff: float = 0.7  # decode DRAM bandwidth / 288 GB/s spec (DRAM-sharded matmuls)
    kv_dram_eff: float = 0.6  # KV-cache reads / 288 GB/s (interleaved paged cache, SDPA decode)
    prefill_dram_eff: float = 0.3  # prefill weight streaming / 288 GB/s (2-D multicast matmuls)
    compute_eff: float = 0.45  # achieved / peak matmul throughput
    softmax_cycles: float = 300.0  # vector-unit cycles per 32x32 attention score tile
    decode_op_us: float = 5.0  # device dispatch per op, decode (traced)
    prefill_op_us: float = 40.0  # host dispatch per op, prefill (not traced)
    token_us: float = 4000.0  # fixed per decode step
    user_layer_us: float = 4.0  # per user per decoder layer (one chip holding all kv heads)
    user_step_us: float = 140.0  # per user per decode step (sampling, output handling), per replica
    prefill_user_ms: float = 12.0  # per extra prompt of a batched prefill
    eth_eff: float = 1.0  # ethernet payload efficiency (of 12 GB/s per link)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def replace(self, **kw) -> "Params":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Params":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown perf parameter(s) {sorted(unknown)}; legal: {', '.join(sorted(names))}")
        return cls(**{k: float(v) for k, v in d.items()})


@lru_cache(maxsize=8)
def _load_params_file(path: str) -> tuple[Params, dict]:
    data = json.loads(Path(path).read_text())
    return Params.from_dict(data["params"]), data


def load_params(path: str | Path | None = None) -> Params:
    """The committed calibration (engine/data/perf_params.json), or Params() defaults if absent."""
    p = Path(path) if path else PARAMS_FILE
    if not p.exists():
        if path:
            raise FileNotFoundError(f"perf parameter file {p} not found")
        return Params()
    return _load_params_file(str(p.resolve()))[0]


def params_metadata(path: str | Path | None = None) -> dict:
    p = Path(path) if path else PARAMS_FILE
    if not p.exists():
        return {}
    return _load_params_file(str(p.resolve()))[1]


def calibration_note(path: str | Path | None = None) -> str:
    """One line for under a report table: where the speed / TTFT figures come from."""
    meta = params_metadata(path).get("calibration") or {}
    if not meta:
        return ("Speed and TTFT are predictions of the analytic Wormhole performance model "
                "(engine/perf.py) with uncalibrated default parameters.")
    m = meta.get("mape", {})
    return (
        "Speed (t/s/u) and TTFT (ms) are predictions of the analytic Wormhole performance model "
        f"(engine/perf.py), calibrated on {meta.get('rows_used', '?')} N150/N300 rows of "
        f"{meta.get('source', 'the seed tables')} ({meta.get('date', '?')}): mean abs. error "
        f"{m.get('speed', float('nan')):.1f}% speed, {m.get('ttft', float('nan')):.1f}% TTFT; "
        "T3K/TG figures are physics-only predictions, never fitted."
    )


# --------------------------------------------------------------------------------------------
_BPE: dict = {}


def bytes_per_element(p: Precision | str | None) -> float:
    """Storage bytes per element of a precision (None = `mixed` activation, costed as bf16)."""
    v = _BPE.get(p)
    if v is None:
        from engine.formats import bytes_per_element as bpe  # the formats module is the single source

        v = 2.0 if p is None else float(bpe(p.value if isinstance(p, Precision) else str(p)))
        _BPE[p] = v
    return v


@dataclass
class PerfResult:
    model: str
    device: str
    speed_tsu: float  # decode tokens / s / user
    ttft_ms: float  # time to first token (prefill of one prompt; batch average)
    breakdown: dict[str, dict[str, float]]
    decode_step_ms: float
    prefill_ms: float  # prefill of one prompt
    batch: int
    prefill: int
    decode: int
    dp: int
    tp: int
    layout: str
    config: str
    throughput_tps: float  # all users of all replicas
    weights_gb_per_chip: float
    kv_cache_gb_per_chip: float
    fits: bool
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Acc:
    """Accumulates per-op components: mem/compute/overhead microseconds, bytes and FLOPs."""

    __slots__ = ("d",)

    def __init__(self) -> None:
        self.d: dict[str, dict[str, float]] = {}

    def add(self, op: str, phase: str, mem_us: float, comp_us: float, ovh_us: float,
            nbytes: float = 0.0, flops: float = 0.0, count: float = 1.0, wbytes: float = 0.0) -> None:
        e = self.d.get(op)
        if e is None:
            e = self.d[op] = {k: 0.0 for k in (
                "decode_us", "prefill_us", "decode_mem_us", "decode_compute_us", "decode_overhead_us",
                "prefill_mem_us", "prefill_compute_us", "prefill_overhead_us", "bytes", "weight_bytes",
                "kv_bytes", "flops", "prefill_bytes", "prefill_flops")}
        e[f"{phase}_us"] += count * (max(mem_us, comp_us) + ovh_us)
        e[f"{phase}_mem_us"] += count * mem_us
        e[f"{phase}_compute_us"] += count * comp_us
        e[f"{phase}_overhead_us"] += count * ovh_us
        if phase == "decode":
            e["bytes"] += count * nbytes
            e["weight_bytes"] += count * wbytes
            e["flops"] += count * flops
        else:
            e["prefill_bytes"] += count * nbytes
            e["prefill_flops"] += count * flops

    def merge(self, other: "_Acc", count: float) -> None:
        for op, e in other.d.items():
            mine = self.d.setdefault(op, {k: 0.0 for k in e})
            for k, v in e.items():
                mine[k] += count * v


def _ceil(a: float, b: float) -> int:
    return -(-int(a) // int(b))


class _Cost:
    """Costs of one model on one replica with given run settings."""

    def __init__(self, shape: ModelShape, rep: Replica, params: Params, batch: int, prefill: int, decode: int):
        s, chip = shape, rep.chip
        self.s, self.rep, self.p = s, rep, params
        self.batch, self.prefill, self.decode = batch, prefill, decode
        self.ctx = max(1.0, prefill + decode / 2.0)  # mean attended positions over the decode steps
        self.bw = chip.dram_bw_gbs * 1e3  # bytes per us per chip
        self.clk = chip.clock_ghz * 1e3  # cycles per us
        self.cyc = chip.cycles_per_tile_phase
        self.eth = chip.eth_payload_gbs * 1e3 * params.eth_eff  # bytes per us per link
        self.hop = chip.hop_us
        kspl, nspl = rep.mesh_kn
        self.kspl, self.nspl = kspl, nspl
        heads_split = nspl  # heads follow the N split (column-parallel qkv)
        self.h_loc = _ceil(s.n_heads, heads_split)
        self.kv_loc = _ceil(s.n_kv_heads, heads_split)
        self.group_rows = _ceil(max(1, s.n_heads // max(1, s.n_kv_heads)), 32)  # q heads per kv head, tile-padded
        self.users_loc = _ceil(batch, rep.mesh[1]) if rep.layout == "mesh2d" else batch  # TG splits users over rows
        self.m_dec = 32 * _ceil(batch, 32)  # decode rows, padded to a tile
        self.ccl_bpe = 1.0625 if rep.layout == "mesh2d" else 2.0  # TG collectives run in bfp8
        hd = s.head_dim
        # (K, N) of each matmul on one chip
        self.mm = {
            "qkv": (_ceil(s.hidden, kspl), (self.h_loc + 2 * self.kv_loc) * hd),
            "wo": (self.h_loc * hd, _ceil(s.hidden, kspl) if rep.layout == "mesh2d" else s.hidden),
            "ff1": (_ceil(s.hidden, kspl), _ceil(s.intermediate, nspl)),
            "ff2": (_ceil(s.intermediate, nspl), _ceil(s.hidden, kspl) if rep.layout == "mesh2d" else s.hidden),
            "lm": (_ceil(s.hidden, kspl), _ceil(s.vocab, nspl)),
        }

    # --- building blocks ---------------------------------------------------------------------
    def _tiles(self, m_rows: int, k: int, n: int) -> int:
        return _ceil(m_rows, 32) * _ceil(k, 32) * _ceil(n, 32)

    def _collective(self, acc: _Acc, phase: str, kind: str, payload: float, n: int, links: int,
                    ring: bool = False, count: float = 1.0) -> None:
        """A reduce-scatter or all-gather of a `payload`-byte tensor over n chips."""
        if n <= 1:
            return
        frac = (n - 1) / n * payload
        if ring:
            data_us = frac / (2 * links * self.eth)
            hops = math.ceil((n - 1) / 2)
        else:
            data_us = frac / (links * self.eth)
            hops = n - 1
        ovh = self.p.decode_op_us if phase == "decode" else self.p.prefill_op_us
        acc.add("ccl", phase, data_us, 0.0, hops * self.hop + ovh, nbytes=0.0, count=count)

    def _all_reduce(self, acc: _Acc, phase: str, payload: float, axis: int | None = None, count: float = 1.0) -> None:
        rep = self.rep
        if rep.layout == "single":
            return
        if rep.layout == "mesh2d":
            n, links = rep.mesh[axis], rep.links[axis]
            ring = False
        else:
            n, links, ring = rep.tp, rep.links[0], rep.layout == "ring"
        self._collective(acc, phase, "rs", payload, n, links, ring, count)
        self._collective(acc, phase, "ag", payload, n, links, ring, count)

    def _matmul(self, acc: _Acc, op: str, phase: str, k: int, n: int, wbytes_el: float, fid: FidelitySetting,
                act_in: float, act_out: float, rows: int, count: float = 1.0) -> None:
        p = self.p
        phases = PHASES[fid]
        tiles = self._tiles(rows, k, n)
        wbytes = k * n * wbytes_el
        abytes = rows * (k * act_in + n * act_out)
        if phase == "decode":
            cores = self.rep.chip.dram_banks
            mem = wbytes / (self.bw * p.dram_eff) + abytes / (self.bw * p.dram_eff)
            ovh = p.decode_op_us
            nbytes = wbytes + abytes
        else:
            cores = self.rep.chip.cores
            reads = _ceil(rows, PREFILL_BLOCK_ROWS)
            mem = reads * wbytes / (self.bw * p.prefill_dram_eff) + abytes / (self.bw * p.dram_eff)
            ovh = p.prefill_op_us
            nbytes = reads * wbytes + abytes
        comp = tiles * self.cyc * phases / (cores * self.clk * p.compute_eff)
        acc.add(op, phase, mem, comp, ovh, nbytes=nbytes, flops=2.0 * rows * k * n, count=count,
                wbytes=wbytes if phase == "decode" else 0.0)

    def _eltwise(self, acc: _Acc, phase: str, rows: int, nbytes: float, n_ops: int) -> None:
        ovh = self.p.decode_op_us if phase == "decode" else self.p.prefill_op_us
        acc.add("eltwise", phase, nbytes / (self.bw * self.p.dram_eff), 0.0, n_ops * ovh, nbytes=nbytes)

    # --- one decoder layer ---------------------------------------------------------------------
    def layer(self, cfg: Config) -> _Acc:
        acc = _Acc()
        self._layer_decode(acc, cfg)
        if self.prefill > 0:
            self._layer_prefill(acc, cfg)
        return acc

    def _act(self, cfg: Config, default: float) -> float:
        return bytes_per_element(cfg.activation) if cfg.activation is not None else default

    def _linears(self, acc: _Acc, cfg: Config, phase: str, rows: int) -> None:
        """The four linears of one layer: weight bytes in their formats, the op groups' fidelity,
        activation bytes in and out (`mixed`: bf16, except the bfp8 SiLU product feeding w2 and,
        in prefill, wo's bfp8 input and output)."""
        bf16, bfp8 = 2.0, 1.0625
        prefill = phase == "prefill"
        wo_io = (self._act(cfg, bfp8), self._act(cfg, bfp8)) if prefill else (bf16, self._act(cfg, bf16))
        for op, mm, fmt, fid, io, count in (
            ("qkv", "qkv", cfg.wqkv, cfg.li_qkv_prefill if prefill else cfg.li_qkv_decode, (bf16, self._act(cfg, bf16)), 1),
            ("wo", "wo", cfg.wo, cfg.li_o_prefill if prefill else cfg.li_o_decode, wo_io, 1),
            ("ff1_3", "ff1", cfg.ff1_3, cfg.li_ff1_3, (bf16, self._act(cfg, bf16)), 2),
            ("ff2", "ff2", cfg.ff2, cfg.li_ff2, (self._act(cfg, bfp8), self._act(cfg, bf16)), 1),
        ):
            k, n = self.mm[mm]
            self._matmul(acc, op, phase, k, n, bytes_per_element(fmt), fid, *io, rows, count=count)

    def _layer_decode(self, acc: _Acc, cfg: Config) -> None:
        s, p, rows = self.s, self.p, self.m_dec
        bf16 = 2.0
        nq, n1 = self.mm["qkv"][1], self.mm["ff1"][1]
        self._linears(acc, cfg, "decode", rows)
        # attention over the KV cache
        kvb = bytes_per_element(cfg.kv_cache)
        u, hd = self.users_loc, s.head_dim
        kv_bytes = u * 2 * self.kv_loc * hd * self.ctx * kvb
        ct = math.ceil(self.ctx / 32)
        score_tiles = u * self.kv_loc * self.group_rows * ct
        mm_tiles = score_tiles * _ceil(hd, 32) * 2
        cores = self.rep.chip.cores
        comp = (mm_tiles * self.cyc * PHASES[cfg.sdpa_decode] / (cores * self.clk * p.compute_eff)
                + score_tiles * p.softmax_cycles / (cores * self.clk))
        per_user = u * p.user_layer_us * self.kv_loc / s.n_kv_heads
        acc.add("sdpa", "decode", kv_bytes / (self.bw * p.kv_dram_eff), comp, p.decode_op_us + per_user,
                nbytes=kv_bytes, flops=2.0 * 2 * u * self.h_loc * hd * self.ctx)
        acc.d["sdpa"]["kv_bytes"] += kv_bytes
        upd = u * 2 * self.kv_loc * hd * kvb
        acc.add("kv_cache", "decode", upd / (self.bw * p.dram_eff), 0.0, p.decode_op_us, nbytes=upd)
        # norms, heads, rotary, residuals, SiLU*w3: dispatch-bound at 32 rows
        self._eltwise(acc, "decode", rows, rows * (6 * s.hidden + 3 * n1) * bf16, len(ELTWISE_OPS))
        self._layer_ccl(acc, "decode", rows, nq, n1)

    def _layer_ccl(self, acc: _Acc, phase: str, rows: int, n_qkv: int, n_ff1: int) -> None:
        rep, s, b = self.rep, self.s, self.ccl_bpe
        if rep.layout == "single":
            return
        if rep.layout == "mesh2d":
            # K axis of qkv / w1 / w3 is mesh axis 1 (4 chips), of wo / w2 mesh axis 0 (8 chips)
            self._all_reduce(acc, phase, rows * n_qkv * b, axis=1)
            self._all_reduce(acc, phase, rows * _ceil(s.hidden, rep.mesh[1]) * b, axis=0)
            n, links = rep.mesh[1], rep.links[1]
            self._collective(acc, phase, "rs", rows * n_ff1 * b, n, links, count=2)  # w1, w3 partials
            self._collective(acc, phase, "ag", rows * n_ff1 * b, n, links)  # w2 input
            self._all_reduce(acc, phase, rows * _ceil(s.hidden, rep.mesh[1]) * b, axis=0)
            self._collective(acc, phase, "ag", rows * 32 * 2.0, n, links, count=2)  # distributed-norm stats
        else:
            self._all_reduce(acc, phase, rows * s.hidden * b, count=2)  # after wo and after w2

    def _layer_prefill(self, acc: _Acc, cfg: Config) -> None:
        s, p = self.s, self.p
        T = self.prefill
        rows = 32 * _ceil(T, 32)
        bf16, bfp8 = 2.0, 1.0625
        nq, n1 = self.mm["qkv"][1], self.mm["ff1"][1]
        self._linears(acc, cfg, "prefill", rows)
        # causal attention: ~T^2/2 score tiles per local head
        hd, cores = s.head_dim, self.rep.chip.cores
        mt = _ceil(T, 32)
        score_tiles = self.h_loc * mt * (mt + 1) / 2
        mm_tiles = score_tiles * _ceil(hd, 32) * 2
        comp = (mm_tiles * self.cyc * PHASES[cfg.sdpa_prefill] / (cores * self.clk * p.compute_eff)
                + score_tiles * p.softmax_cycles / (cores * self.clk))
        io = rows * (2 * self.h_loc + 2 * self.kv_loc) * hd * self._act(cfg, bfp8)
        acc.add("sdpa", "prefill", io / (self.bw * p.dram_eff), comp, p.prefill_op_us,
                nbytes=io, flops=2.0 * 2 * self.h_loc * hd * T * (T + 1) / 2)
        fill = rows * 2 * self.kv_loc * hd * bytes_per_element(cfg.kv_cache)
        acc.add("kv_cache", "prefill", fill / (self.bw * p.dram_eff), 0.0, p.prefill_op_us, nbytes=fill)
        h_loc = _ceil(s.hidden, self.kspl)
        # two norms (read + write bf16), two residual adds (2 reads + 1 write), create-heads and
        # rotary on qkv, concat-heads, SiLU(w1)*w3 (two reads, one write)
        elt = rows * (2 * 4 * h_loc + 2 * 6 * h_loc + 2 * 4 * nq + 4 * self.h_loc * hd
                      + n1 * (2 * self._act(cfg, bf16) + self._act(cfg, bfp8)))
        self._eltwise(acc, "prefill", rows, elt, len(ELTWISE_OPS))
        self._layer_ccl(acc, "prefill", rows, nq, n1)

    # --- once per model --------------------------------------------------------------------------
    def model_level(self) -> _Acc:
        acc, p, rep = _Acc(), self.p, self.rep
        k, n = self.mm["lm"]
        self._matmul(acc, "lm_head", "decode", k, n, 1.0625, FidelitySetting.HIFI2, 2.0, 2.0, self.m_dec)
        acc.add("embed_norm_sample", "decode", 0.0, 0.0, 3 * p.decode_op_us)
        acc.add("host", "decode", 0.0, 0.0, p.token_us + self.batch * p.user_step_us)
        if rep.layout == "mesh2d":
            self._all_reduce(acc, "decode", self.m_dec * n * 2.0, axis=1)
        elif rep.layout != "single":
            self._collective(acc, "decode", "ag", self.m_dec * self.s.hidden * self.ccl_bpe, rep.tp,
                             rep.links[0], rep.layout == "ring")  # final norm output to every chip
        if self.prefill > 0:
            self._matmul(acc, "lm_head", "prefill", k, n, 1.0625, FidelitySetting.HIFI2, 2.0, 2.0, 32)
            acc.add("embed_norm_sample", "prefill", 0.0, 0.0, 3 * p.prefill_op_us)
            if rep.layout == "mesh2d":
                self._all_reduce(acc, "prefill", 32 * n * 2.0, axis=1)
        return acc

    def memory(self, per_cfg: dict[Config, int]) -> tuple[float, float]:
        """(weights GB per chip, KV cache GB per chip) for the run."""
        s = self.s
        lw = s.layer_weights()
        w = kv = 0.0
        n = 0
        for cfg, count in per_cfg.items():
            n += count
            w += count * (lw["wqkv"] * bytes_per_element(cfg.wqkv) + lw["wo"] * bytes_per_element(cfg.wo)
                          + lw["ff1_3"] * bytes_per_element(cfg.ff1_3) + lw["ff2"] * bytes_per_element(cfg.ff2))
            kv += count * (self.users_loc * 2 * self.kv_loc * s.head_dim * (self.prefill + self.decode)
                           * bytes_per_element(cfg.kv_cache))
        if s.cross_attention_layers:
            w += w / n * s.cross_attention_layers
        w += s.vocab * s.hidden * (1.0625 + 2.0)  # LM head (bfp8) + embedding table (bf16)
        w /= self.rep.tp
        return w / 1e9, kv / 1e9


# --------------------------------------------------------------------------------------------
def _model_name(model: Any, shape: ModelShape) -> str:
    return model if isinstance(model, str) else shape.name


@lru_cache(maxsize=512)
def _layers_from_text(config: str, n_layers: int, model_name: str) -> tuple[Config, ...]:
    if "decoders = {" in config:
        return ModelConfig.parse(config, n_layers, model_name).layers
    return (resolve(config, model_name),) * n_layers


def _layers(config: Any, shape: ModelShape, model_name: str) -> list[Config]:
    if isinstance(config, ModelConfig):
        if config.n_layers != shape.n_layers:
            raise ValueError(f"config has {config.n_layers} decoder layers but {shape.name} has {shape.n_layers}")
        return list(config.layers)
    if isinstance(config, Config):
        return [config] * shape.n_layers
    if isinstance(config, str):
        return list(_layers_from_text(config, shape.n_layers, model_name))
    raise TypeError(f"config must be a Config, ModelConfig or string, not {type(config).__name__}")


def predict(
    model: str | Any,
    device: str = "N150",
    config: Config | ModelConfig | str = "performance",
    *,
    batch: int = 1,
    prefill: int = 128,
    decode: int = 200,
    dp: int = 1,
    params: Params | dict | str | Path | None = None,
) -> PerfResult:
    """Predicted decode speed (t/s/u) and TTFT (ms) of `model` on `device` under `config`.

    `batch` is per data-parallel replica (as in the seed: "Batch_size=1 (per DP group)"), `prefill`
    the prompt length, `decode` the generated length, `dp` the number of replicas (each on
    chips/dp chips). `params`: a Params, a dict of overrides, or a parameter file path; default
    the committed calibration.
    """
    if batch < 1 or prefill < 0 or decode < 1:
        raise ValueError(f"need batch >= 1, prefill >= 0, decode >= 1 (got {batch}, {prefill}, {decode})")
    if isinstance(params, Params):
        prm = params
    elif isinstance(params, dict):
        prm = load_params().replace(**params)
    else:
        prm = load_params(params)
    shape = shape_for(model)
    name = _model_name(model, shape)
    dev = device_for(device)
    rep = dev.replica(dp)
    layers = _layers(config, shape, name)
    cost = _Cost(shape, rep, prm, batch, prefill, decode)

    total = _Acc()
    by_id: dict[int, list] = {}  # group identical layers by identity first (hashing a Config is slow)
    for cfg in layers:
        e = by_id.get(id(cfg))
        if e is None:
            by_id[id(cfg)] = [cfg, 1]
        else:
            e[1] += 1
    per_cfg: dict[Config, int] = {}
    for cfg, count in by_id.values():
        per_cfg[cfg] = per_cfg.get(cfg, 0) + count
    for cfg, count in per_cfg.items():
        total.merge(cost.layer(cfg), count)
    total.merge(cost.model_level(), 1)

    step_us = sum(e["decode_us"] for e in total.d.values())
    prefill_us = sum(e["prefill_us"] for e in total.d.values())
    ttft_us = prefill_us + (batch - 1) / batch * prm.prefill_user_ms * 1e3
    breakdown = {}
    for op in OPS:
        e = total.d.get(op)
        if e is None:
            continue
        e = dict(e)
        e["decode_share"] = e["decode_us"] / step_us if step_us else 0.0
        e["prefill_share"] = e["prefill_us"] / prefill_us if prefill_us else 0.0
        breakdown[op] = e
    w_gb, kv_gb = cost.memory(per_cfg)
    speed = 1e6 / step_us
    cfg_text = config if isinstance(config, str) else str(config)
    return PerfResult(
        model=name, device=dev.name, speed_tsu=speed, ttft_ms=ttft_us / 1e3, breakdown=breakdown,
        decode_step_ms=step_us / 1e3, prefill_ms=prefill_us / 1e3, batch=batch, prefill=prefill,
        decode=decode, dp=dp, tp=rep.tp, layout=rep.layout, config=cfg_text,
        throughput_tps=speed * batch * dp, weights_gb_per_chip=w_gb, kv_cache_gb_per_chip=kv_gb,
        fits=(w_gb + kv_gb) <= rep.chip.dram_gb, params=prm.to_dict(),
    )
