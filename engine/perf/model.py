"""Analytic performance model for Llama-family decoders on Tenstorrent systems (docs/PERF-MODEL.md).

`predict(model, device, config)` returns decode speed (tokens/s/user) and time to first token
(ms) from first principles (docs/NUMERICS.md), with every op's share in
`PerfResult.breakdown`.

Decode (one step: every user of the replica advances one token). Per decoder layer, each op:

    time = max(DRAM time, compute time) + per-op dispatch overhead

* matmuls (qkv, wo, w1+w3, w2): weights are read once per step in their storage format
  (bfp4 0.5625, bfp8 1.0625, bf16 2 bytes/element) at `dram_eff` x the chip's DRAM spec; compute pads
  the decode rows to 32 (batch 1..32 cost the same): 1 x K/32 x N/32 tiles, 16 cycles per tile per
  fidelity phase (LoFi 1, HiFi2 2, HiFi3 3, HiFi4 4), on the DRAM-bank worker cores (12 on Wormhole) of a
  DRAM-sharded matmul, at `compute_eff` of peak;
* SDPA decode: reads each user's K and V cache up to the current position in the kv_cache format
  (an interleaved paged cache: at `kv_dram_eff` of the DRAM spec),
  computes Q.K^T and P.V with the query heads of one kv head padded to a 32-row tile, plus
  `softmax_cycles` of vector-unit work per 32x32 score tile, over all 64 cores; plus
  `user_layer_us` per user of bookkeeping (cache update, per-user reductions), shared by the
  chips that hold the user's kv heads;
* KV-cache update, norms, rotary, head reshapes, residual adds and SiLU*w3: dispatch + bytes;
* tensor-parallel collectives (below); LM head (bfp8 weights, HiFi2) once per step;
* per step: `token_us` (host loop, trace launch, output readback) + `user_step_us` per user
  (sampling and per-user output handling on the host) + `replica_us` per extra DP replica.

Prefill (TTFT) of one prompt of T tokens: compute-bound at long T and weight-streaming /
dispatch-bound at short T. Matmul tiles ceil(T/32) x K/32 x N/32 at the op's prefill fidelity over
64 cores; weights re-read per 1024-row block (tt_transformers' Wormhole prefill cut-off) at
`prefill_dram_eff` (the 2-D multicast program reads through one core per column); causal
attention ~ T^2/2 score tiles per head (Q.K^T + P.V at sdpa_prefill fidelity + softmax); activation
traffic of every op; `prefill_op_us` per op (prefill is not traced). TTFT = prefill time of one
prompt; a batch of B prompts is prefilled one after the other and its average TTFT adds
(B-1)/B x `prefill_user_ms` (the batched-prefill loop's per-prompt host work).

Long prompts are prefilled in chunks of tt_transformers' MAX_PREFILL_CHUNK_SIZES_DIV1024 for the
model and system (engine/models/shapes.py): every chunk dispatches every op and collective again and
attends to the cached prefix (read back from DRAM); the causal attention work is the same.

Multi-chip (devices.py, ccl.py): tensor parallel splits every weight and the heads over the
replica's chips. The collectives are the ones tt_transformers issues per layer on that layout
(engine/perf/ccl.py: 4 per layer on a line or ring, 8-9 along the rows and columns of the Galaxy
mesh), each priced as a fixed launch cost (`ccl_us` traced in decode; `ccl_prefill_us` per chip
when prefill dispatches it from the host), a per-step latency (`hop_us` of the chip +
`ccl_step_us`) times the steps of its topology, and the bytes of its busiest link direction
over links x 12 GB/s x `eth_eff`. Each collective is its own `ccl:<name>` entry of the
breakdown and of `PerfResult.collectives`. DP=N runs N replicas of chips/N chips from one host:
each decode step adds `replica_us` per extra replica and the host's per-user work for every
user of every replica; the replicas prefill their prompts concurrently (host dispatch serial,
device work overlapped), so TTFT = dispatch + device time / N.

SDPA decode at long context is bounded by its chunk chain: each (user, kv head) pair walks the
cache on its own group of cores, `sdpa_pos_ns` per attended position, however many chips share
the heads (the seed's 64K decode speeds barely rise from N300 to T3K).

The global parameters are fitted by `engine.perf.calibrate` on the N150, N300 and T3K rows of the
seed's tables (`sweep perf calibrate`) and live in `engine/data/perf_params.json` with the
calibration's residuals; `predict` turns those into prediction intervals (`interval`). TG and
Blackhole are never fitted: TG is the model's validation set, Blackhole has no published rows.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from engine.models.shapes import shape_for
from engine.models.spec import ModelSpec
from engine.perf import ccl
from engine.vocab import formats, ops
from engine.vocab.config import LM_HEAD, Config, FidelitySetting, ModelConfig, Precision, decoder_json_file, fidelity_of
from engine.vocab.devices import DEVICES, Device, Replica, device_for

PARAMS_FILE = Path(__file__).resolve().parents[1] / "data" / "perf_params.json"

#: Fidelity phases per setting, from the one setting table (FidelitySetting.kernel); the emulator's
#: `exact` reference is costed as HiFi4.
PHASES = {f: f.kernel.phases or 4 for f in FidelitySetting}
BF16, BFP8 = formats.bytes_per_element("bf16"), formats.bytes_per_element("bfp8")
LM_HEAD_BYTES, LM_HEAD_FID = formats.bytes_per_element(LM_HEAD[0]), fidelity_of(LM_HEAD[1])  # tt/lm_head.py

ELTWISE_OPS = ("attn_norm", "create_heads", "rotary", "concat_heads", "residual_1", "ff_norm", "silu_mul", "residual_2")
OPS = ("qkv", "sdpa", "kv_cache", "wo", "ff1_3", "ff2", "eltwise", "lm_head", "embed_norm_sample", "host")
CCL_PREFIX = "ccl:"  # breakdown entries of the collectives: "ccl:wo.reduce_scatter", ...


class NotCovered(ValueError):
    """The model is one the performance model does not price (the message says why)."""


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
    eth_eff: float = 0.7  # ethernet payload efficiency (of the chip's per-link payload bandwidth)
    ccl_us: float = 10.0  # per collective launch in traced decode (program, semaphores, fabric handshake)
    ccl_step_us: float = 2.0  # per collective step on top of the chip's hop latency (handshake, local reduce)
    ccl_prefill_us: float = 30.0  # per chip per collective in prefill (untraced: host dispatch, fabric setup)
    replica_us: float = 300.0  # per extra data-parallel replica per decode step (one host drives them all)
    sdpa_pos_ns: float = 3.0  # SDPA decode chunk chain: ns per attended position per (user, kv head) group

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
def load_params_file(path: str) -> tuple[Params, dict]:
    data = json.loads(Path(path).read_text())
    return Params.from_dict(data["params"]), data


def load_params(path: str | Path | None = None) -> Params:
    """The committed calibration (engine/data/perf_params.json), or Params() defaults if absent."""
    p = Path(path) if path else PARAMS_FILE
    if not p.exists():
        if path:
            raise FileNotFoundError(f"perf parameter file {p} not found")
        return Params()
    return load_params_file(str(p.resolve()))[0]


def params_metadata(path: str | Path | None = None) -> dict:
    p = Path(path) if path else PARAMS_FILE
    if not p.exists():
        return {}
    return load_params_file(str(p.resolve()))[1]


def calibration_note(path: str | Path | None = None) -> str:
    """One line for under a report table: where the speed / TTFT figures come from and how far
    to trust them (calibration error, leave-one-device-out error, the interval's level)."""
    meta = params_metadata(path).get("calibration") or {}
    if not meta:
        return ("Speed and TTFT are predictions of the analytic performance model "
                "(engine/perf/model.py) with uncalibrated default parameters.")
    m = meta.get("mape", {})
    devs = "/".join(meta.get("devices") or ["N150", "N300"])
    text = (
        "Speed (t/s/u) and TTFT (ms) are predictions of the analytic performance model "
        f"(engine/perf/model.py), calibrated on {meta.get('rows_used', '?')} {devs} rows of "
        f"{meta.get('source', 'the seed tables')} ({meta.get('date', '?')}): mean abs. error "
        f"{m.get('speed', float('nan')):.1f}% speed, {m.get('ttft', float('nan')):.1f}% TTFT"
    )
    lodo = meta.get("lodo") or {}
    if lodo:
        parts = [f"{d} {v['speed_mape']:.0f}%/{v['ttft_mape']:.0f}%" for d, v in lodo.items()
                 if v.get("speed_mape") is not None and v.get("ttft_mape") is not None]
        text += f"; leave-one-device-out speed/TTFT error {', '.join(parts)}"
    iv = (params_metadata(path).get("intervals") or {})
    if iv:
        text += (f"; intervals are {100 * iv['level']:.0f}% prediction intervals from the cross-validated "
                 "residuals, wider off the calibrated devices and models")
    uncal = [d for d in DEVICES if d not in (meta.get("devices") or [])]
    if uncal:
        text += f"; {'/'.join(uncal)} are never fitted (physics-only predictions)"
    return text + "."


# --- prediction intervals --------------------------------------------------------------------
ARCH_DISTANCE = 2.0  # an unmeasured architecture counts as two chip-count doublings away


def device_distance(device: str | Device, calibrated: Sequence[str]) -> float:
    """How far a system is from the calibrated ones: 0 for a calibrated system, else the
    log2 chip-count ratio to the nearest calibrated system of its architecture, + 1 if its
    layout (line / ring / 2-D mesh) is none of theirs, + ARCH_DISTANCE for an architecture with
    no calibrated system at all."""
    dev = device_for(device)
    cal = [device_for(c) for c in calibrated]
    if dev.name in {c.name for c in cal}:
        return 0.0
    same_arch = [c for c in cal if c.arch == dev.arch]
    pool = same_arch or cal
    if not pool:
        return ARCH_DISTANCE + 1.0
    d = min(abs(math.log2(dev.chips / c.chips)) for c in pool)
    if dev.topology not in {c.topology for c in pool}:
        d += 1.0
    return d + (0.0 if same_arch else ARCH_DISTANCE)


def interval(metric: str, value: float, device: str | Device, model: str, path: str | Path | None = None
             ) -> tuple[float, float, float] | None:
    """(low, high, distance) of the prediction interval of `metric` ("speed" or "ttft") around
    `value`, or None without a calibration. Half-width in log space: the conformal quantile of
    the in-sample residuals for a calibrated model on a calibrated system, of the
    leave-one-model-out residuals for an unseen model, plus (leave-one-device-out quantile - the
    in-sample one) x distance / the mean distance of the leave-one-device-out folds for a system
    off the calibration data: it widens with the distance."""
    w = half_width(metric, device, model, path)
    if w is None:
        return None
    h, _, d = w
    return value * math.exp(-h), value * math.exp(h), d


def half_width(metric: str, device: str | Device, model: str, path: str | Path | None = None
                ) -> tuple[float, float, float] | None:
    """(log half-width, its part without the distance term, distance) of `interval`."""
    data = params_metadata(path)
    iv, meta = data.get("intervals"), data.get("calibration") or {}
    if not iv or metric not in iv:
        return None
    q = iv[metric]
    try:
        model = shape_for(model).name
    except (ValueError, TypeError):
        pass
    base = q["in_sample"] if model in set(meta.get("models", ())) else max(q["in_sample"], q["lomo"])
    d = device_distance(device, meta.get("devices", ()))
    return base + max(0.0, q["lodo"] - q["in_sample"]) * d / max(iv.get("lodo_distance", 1.0), 1e-9), base, d


# --------------------------------------------------------------------------------------------
_BPE: dict = {}


def bytes_per_element(p: Precision | str | None) -> float:
    """Storage bytes per element of a precision (None = `mixed` activation, costed as bf16)."""
    v = _BPE.get(p)
    if v is None:
        from engine.vocab.formats import bytes_per_element as bpe  # the formats module is the single source

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
    # prediction intervals (calibration residuals; None without a calibration) and provenance
    speed_interval: tuple[float, float] | None = None
    ttft_interval: tuple[float, float] | None = None
    interval_level: float | None = None
    distance: float = 0.0  # from the calibration data (0: a calibrated system); see perf.device_distance
    calibrated_device: bool = False
    system: str = ""  # the table row one replica runs as
    prefill_chunks: int = 1
    collectives: list[dict] = field(default_factory=list)  # per collective: kind, chips, links, bytes, us
    warnings: list[str] = field(default_factory=list)

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


#: Each priced linear's row of the op table, (decode, prefill).
LINEAR_OPS = {"qkv": ("li_qkv_decode", "li_qkv_prefill"), "wo": ("li_o_decode", "li_o_prefill"),
              "ff1_3": ("li_ff1_3", "li_ff1_3"), "ff2": ("li_ff2", "li_ff2")}


def linear_io(cfg: Config, op: str, prefill: bool) -> tuple[float, float]:
    """Activation bytes per element (in, out) the performance model prices for a linear (`mixed`:
    bf16, except the bfp8 SiLU product feeding w2 and, in prefill, wo's bfp8 input and output).
    The op table's dtypes agree for `mixed` layers; under a forced activation this costs the qkv
    and w1/w3 inputs as bf16 and the decode wo output in the activation (the table: the
    activation, and bf16): tests/test_op_table.py marks that known difference."""
    act = (lambda d: bytes_per_element(cfg.activation) if cfg.activation is not None else d)  # noqa: E731
    if op == "wo":
        return (act(BFP8), act(BFP8)) if prefill else (BF16, act(BF16))
    if op == "ff2":
        return act(BFP8), act(BF16)
    return BF16, act(BF16)


class _Cost:
    """Costs of one model on one replica with given run settings."""

    def __init__(self, shape: ModelSpec, rep: Replica, params: Params, batch: int, prefill: int, decode: int):
        s, chip = shape, rep.chip
        self.s, self.rep, self.p = s, rep, params
        self.batch, self.prefill, self.decode = batch, prefill, decode
        self.ctx = max(1.0, prefill + decode / 2.0)  # mean attended positions over the decode steps
        self.bw = chip.dram_bw_gbs * 1e3  # bytes per us per chip
        self.clk = chip.clock_ghz * 1e3  # cycles per us
        self.cyc = chip.cycles_per_tile_phase
        self.eth = chip.eth_payload_gbs * 1e3 * params.eth_eff  # bytes per us per link
        kspl, nspl = rep.mesh_kn
        self.kspl, self.nspl = kspl, nspl
        heads_split = nspl  # heads follow the N split (column-parallel qkv)
        self.h_loc = _ceil(s.n_heads, heads_split)
        self.kv_loc = _ceil(s.n_kv_heads, heads_split)
        self.group_rows = _ceil(max(1, s.n_heads // max(1, s.n_kv_heads)), 32)  # q heads per kv head, tile-padded
        self.users_loc = _ceil(batch, rep.mesh[1]) if rep.layout == "mesh2d" else batch  # TG splits users over columns
        self.m_dec = 32 * _ceil(batch, 32)  # decode rows, padded to a tile
        chunk = s.prefill_chunk(rep.system) if prefill > 0 else None
        self.chunk = min(prefill, chunk) if chunk else prefill  # tokens per prefill chunk
        self.n_chunks = _ceil(prefill, self.chunk) if prefill > 0 else 0
        self.collectives: dict[str, dict] = {}
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

    def _collectives(self, acc: _Acc, phase: str, plan: list[ccl.Collective], count: float = 1.0) -> None:
        """Price each collective of `plan` (engine/perf/ccl.py), `count` times, as its own breakdown entry:
        data and per-step latency are device time; the launch (traced in decode, dispatched per chip
        from the host in prefill) and an all-reduce's local reduce op are overhead."""
        p, chip = self.p, self.rep.chip
        op_us = p.decode_op_us if phase == "decode" else p.prefill_op_us
        for c in plan:
            fixed = p.ccl_us if phase == "decode" else p.ccl_prefill_us * c.n
            data, lat, launch = ccl.cost(c, fixed, chip.hop_us + p.ccl_step_us, self.eth)
            ovh = launch + (op_us if c.kind == "all_reduce" else 0.0)
            acc.add(CCL_PREFIX + c.name, phase, data + lat, 0.0, ovh, count=c.count * count)
            info = self.collectives.setdefault(c.name, {
                "name": c.name, "kind": c.kind, "chips": c.n, "links": c.links, "topology": "ring" if c.ring else "line",
                "axis": c.axis, "per_layer": c.count, "decode_bytes": 0.0, "decode_us_each": 0.0, "prefill_us_each": 0.0})
            info[f"{phase}_us_each"] = data + lat + ovh
            if phase == "decode":
                info["decode_bytes"] = c.payload
                info["decode_wire_bytes"] = ccl.wire_bytes(c.kind, c.n, c.ring, c.payload)

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
            reads = _ceil(rows, self.rep.chip.prefill_block_rows)
            mem = reads * wbytes / (self.bw * p.prefill_dram_eff) + abytes / (self.bw * p.dram_eff)
            ovh = p.prefill_op_us
            nbytes = reads * wbytes + abytes
        comp = tiles * self.cyc * phases / (cores * self.clk * p.compute_eff)
        acc.add(op, phase, mem, comp, ovh, nbytes=nbytes, flops=2.0 * rows * k * n, count=count,
                wbytes=wbytes if phase == "decode" else 0.0)

    def _eltwise(self, acc: _Acc, phase: str, rows: int, nbytes: float, n_ops: int, count: float = 1.0) -> None:
        ovh = self.p.decode_op_us if phase == "decode" else self.p.prefill_op_us
        acc.add("eltwise", phase, nbytes / (self.bw * self.p.dram_eff), 0.0, n_ops * ovh, nbytes=nbytes, count=count)

    def _plan(self, rows: int, phase: str) -> list[ccl.Collective]:
        s = self.s
        return ccl.layer_plan(self.rep, hidden=s.hidden, attn_width=s.attn_width, qkv_out=s.qkv_out,
                              intermediate=s.intermediate, rows=rows, phase=phase)

    # --- one decoder layer ---------------------------------------------------------------------
    def layer(self, cfg: Config) -> _Acc:
        acc = _Acc()
        self._layer_decode(acc, cfg)
        if self.prefill > 0:
            self._layer_prefill(acc, cfg)
        return acc

    def _act(self, cfg: Config, default: float) -> float:
        return bytes_per_element(cfg.activation) if cfg.activation is not None else default

    def _linears(self, acc: _Acc, cfg: Config, phase: str, rows: int, count: float = 1.0) -> None:
        """The four linears of one layer: the weight each reads and its op group's fidelity from the
        op table (engine.vocab.ops), weight bytes in their formats, activation bytes in and out
        (`linear_io`)."""
        prefill = phase == "prefill"
        for op, mm, n_mm in (("qkv", "qkv", 1), ("wo", "wo", 1), ("ff1_3", "ff1", 2), ("ff2", "ff2", 1)):
            row = LINEAR_OPS[op][prefill]
            k, n = self.mm[mm]
            fmt, fid = getattr(cfg, ops.OPS[row].weight), getattr(cfg, row)
            self._matmul(acc, op, phase, k, n, bytes_per_element(fmt), fid, *linear_io(cfg, op, prefill), rows,
                         count=n_mm * count)

    def _layer_decode(self, acc: _Acc, cfg: Config) -> None:
        s, p, rows = self.s, self.p, self.m_dec
        bf16 = BF16
        n1 = self.mm["ff1"][1]
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
        # the chunk chain: each (user, kv head) walks its cache on its own cores, in waves if they outnumber the cores
        chain = self.ctx * p.sdpa_pos_ns / 1e3 * _ceil(u * self.kv_loc, cores)
        per_user = u * p.user_layer_us * self.kv_loc / s.n_kv_heads
        acc.add("sdpa", "decode", kv_bytes / (self.bw * p.kv_dram_eff), max(comp, chain), p.decode_op_us + per_user,
                nbytes=kv_bytes, flops=2.0 * 2 * u * self.h_loc * hd * self.ctx)
        acc.d["sdpa"]["kv_bytes"] += kv_bytes
        upd = u * 2 * self.kv_loc * hd * kvb
        acc.add("kv_cache", "decode", upd / (self.bw * p.dram_eff), 0.0, p.decode_op_us, nbytes=upd)
        # norms, heads, rotary, residuals, SiLU*w3: dispatch-bound at 32 rows
        self._eltwise(acc, "decode", rows, rows * (6 * s.hidden + 3 * n1) * bf16, len(ELTWISE_OPS))
        self._collectives(acc, "decode", self._plan(rows, "decode"))

    def _layer_prefill(self, acc: _Acc, cfg: Config) -> None:
        """One layer over the whole prompt, chunk by chunk: every op and collective runs once per
        chunk on the chunk's rows; causal attention covers the prompt once, and every chunk after
        the first reads the cached prefix back."""
        s, p = self.s, self.p
        T, C, nch = self.prefill, self.chunk, self.n_chunks
        rows = 32 * _ceil(C, 32)
        bf16, bfp8 = BF16, BFP8
        nq, n1 = self.mm["qkv"][1], self.mm["ff1"][1]
        self._linears(acc, cfg, "prefill", rows, count=nch)
        # causal attention: ~T^2/2 score tiles per local head
        hd, cores = s.head_dim, self.rep.chip.cores
        mt = _ceil(T, 32)
        score_tiles = self.h_loc * mt * (mt + 1) / 2
        mm_tiles = score_tiles * _ceil(hd, 32) * 2
        comp = (mm_tiles * self.cyc * PHASES[cfg.sdpa_prefill] / (cores * self.clk * p.compute_eff)
                + score_tiles * p.softmax_cycles / (cores * self.clk))
        kvb = bytes_per_element(cfg.kv_cache)
        prefix = C * nch * (nch - 1) / 2 * 2 * self.kv_loc * hd * kvb  # cached K and V read back by later chunks
        io = nch * rows * (2 * self.h_loc + 2 * self.kv_loc) * hd * self._act(cfg, bfp8) + prefix
        acc.add("sdpa", "prefill", io / (self.bw * p.dram_eff), comp, nch * p.prefill_op_us,
                nbytes=io, flops=2.0 * 2 * self.h_loc * hd * T * (T + 1) / 2)
        fill = nch * rows * 2 * self.kv_loc * hd * kvb
        acc.add("kv_cache", "prefill", fill / (self.bw * p.dram_eff), 0.0, nch * p.prefill_op_us, nbytes=fill)
        h_loc = _ceil(s.hidden, self.kspl)
        # two norms (read + write bf16), two residual adds (2 reads + 1 write), create-heads and
        # rotary on qkv, concat-heads, SiLU(w1)*w3 (two reads, one write)
        elt = rows * (2 * 4 * h_loc + 2 * 6 * h_loc + 2 * 4 * nq + 4 * self.h_loc * hd
                      + n1 * (2 * self._act(cfg, bf16) + self._act(cfg, bfp8)))
        self._eltwise(acc, "prefill", rows, elt, len(ELTWISE_OPS), count=nch)
        self._collectives(acc, "prefill", self._plan(rows, "prefill"), count=nch)

    # --- once per model --------------------------------------------------------------------------
    def model_level(self) -> _Acc:
        acc, p, rep, s = _Acc(), self.p, self.rep, self.s
        k, n = self.mm["lm"]
        self._matmul(acc, "lm_head", "decode", k, n, LM_HEAD_BYTES, LM_HEAD_FID, BF16, BF16, self.m_dec)
        acc.add("embed_norm_sample", "decode", 0.0, 0.0, 3 * p.decode_op_us)
        # one host drives every replica: its loop, one dispatch per extra replica, every user's sampling
        users = rep.dp * self.batch
        acc.add("host", "decode", 0.0, 0.0, p.token_us + (rep.dp - 1) * p.replica_us + users * p.user_step_us)
        self._collectives(acc, "decode", ccl.model_plan(rep, hidden=s.hidden, vocab=s.vocab, rows=self.m_dec))
        if self.prefill > 0:
            self._matmul(acc, "lm_head", "prefill", k, n, LM_HEAD_BYTES, LM_HEAD_FID, BF16, BF16, 32)
            acc.add("embed_norm_sample", "prefill", 0.0, 0.0, 3 * p.prefill_op_us)
            self._collectives(acc, "prefill", ccl.model_plan(rep, hidden=s.hidden, vocab=s.vocab, rows=32))
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
        w += s.vocab * s.hidden * (LM_HEAD_BYTES + BF16)  # LM head (bfp8) + embedding table (bf16)
        w /= self.rep.tp
        return w / 1e9, kv / 1e9


# --------------------------------------------------------------------------------------------
def _model_name(model: Any, shape: ModelSpec) -> str:
    return model if isinstance(model, str) else shape.name


@lru_cache(maxsize=512)
def _layers_from_text(config: str, n_layers: int, model_name: str, content: bytes | None = None) -> tuple[Config, ...]:
    """Per-layer configs as the accuracy side reads them (shipped per-layer presets and decoder JSON
    files included). `content` is the bytes of the file `config` names: part of the cache key, so
    an edited file is read again (an mtime can miss a same-size edit within its resolution)."""
    return ModelConfig.parse(config, n_layers, model_name).layers


def _file_content(config: str) -> bytes | None:
    """The bytes of the decoder JSON file `config` names; None for a preset or config string (or an
    unreadable file: parsing then says why)."""
    path = decoder_json_file(config)
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def _layers(config: Any, shape: ModelSpec, model_name: str) -> list[Config]:
    if isinstance(config, ModelConfig):
        if config.n_layers != shape.n_layers:
            raise ValueError(f"config has {config.n_layers} decoder layers but {shape.name} has {shape.n_layers}")
        return list(config.layers)
    if isinstance(config, Config):
        return [config] * shape.n_layers
    if isinstance(config, str):
        return list(_layers_from_text(config, shape.n_layers, model_name, _file_content(config)))
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
    the committed calibration (then the result carries prediction intervals). Raises NotCovered
    for a model the performance model does not price (the message says why).
    """
    if batch < 1 or prefill < 0 or decode < 1:
        raise ValueError(f"need batch >= 1, prefill >= 0, decode >= 1 (got {batch}, {prefill}, {decode})")
    prm, path = _params(params)
    shape = shape_for(model)
    name = _model_name(model, shape)
    if shape.not_covered:
        raise NotCovered(f"{name}: not covered by the performance model: {shape.not_covered}")
    dev = device_for(device)
    rep = dev.replica(dp)
    layers = _layers(config, shape, name)
    cost = _Cost(shape, rep, prm, batch, prefill, decode)

    per_cfg = _count_layers(layers)
    total = _Acc()
    for cfg, count in per_cfg.items():
        total.merge(cost.layer(cfg), count)
    total.merge(cost.model_level(), 1)

    step_us = sum(e["decode_us"] for e in total.d.values())
    prefill_us = sum(e["prefill_us"] for e in total.d.values())
    # DP replicas prefill concurrently: the host's dispatch is serial, the device work overlaps
    dispatch_us = sum(e["prefill_overhead_us"] for e in total.d.values())
    ttft_us = dispatch_us + (prefill_us - dispatch_us) / dp + (batch - 1) / batch * prm.prefill_user_ms * 1e3
    breakdown = _breakdown(total, step_us, prefill_us)
    collectives = []
    for c in cost.collectives.values():
        e = breakdown.get(CCL_PREFIX + c["name"], {})
        collectives.append({**c, "decode_us": e.get("decode_us", 0.0), "prefill_us": e.get("prefill_us", 0.0)})
    w_gb, kv_gb = cost.memory(per_cfg)
    speed, ttft, cfg_text = 1e6 / step_us, ttft_us / 1e3, config if isinstance(config, str) else str(config)
    res = PerfResult(
        model=name, device=dev.name, speed_tsu=speed, ttft_ms=ttft, breakdown=breakdown,
        decode_step_ms=step_us / 1e3, prefill_ms=prefill_us / 1e3, batch=batch, prefill=prefill,
        decode=decode, dp=dp, tp=rep.tp, layout=rep.layout, config=cfg_text,
        throughput_tps=speed * batch * dp, weights_gb_per_chip=w_gb, kv_cache_gb_per_chip=kv_gb,
        fits=(w_gb + kv_gb) <= rep.chip.dram_gb, params=prm.to_dict(), system=rep.system,
        prefill_chunks=cost.n_chunks, collectives=collectives,
    )
    _qualify(res, dev, path)
    return res


def _params(params: Params | dict | str | Path | None) -> tuple[Params, Any]:
    """(parameters, their file: False for given values, None for the committed calibration)."""
    if isinstance(params, Params):
        return params, False
    if isinstance(params, dict):
        return load_params().replace(**params), False
    return load_params(params), params


def _count_layers(layers: list[Config]) -> dict[Config, int]:
    """How many layers run each distinct config (grouped by identity first: hashing a Config is slow)."""
    by_id: dict[int, list] = {}
    for cfg in layers:
        e = by_id.get(id(cfg))
        if e is None:
            by_id[id(cfg)] = [cfg, 1]
        else:
            e[1] += 1
    per_cfg: dict[Config, int] = {}
    for cfg, count in by_id.values():
        per_cfg[cfg] = per_cfg.get(cfg, 0) + count
    return per_cfg


def _breakdown(total: _Acc, step_us: float, prefill_us: float) -> dict:
    """Per-op entries in display order (collectives between the layer ops and the model-level ones),
    with each op's share of the decode step and of the prefill."""
    breakdown = {}
    for op in (*OPS[:-3], *(k for k in total.d if k.startswith(CCL_PREFIX)), *OPS[-3:]):
        e = total.d.get(op)
        if e is None:
            continue
        e = dict(e)
        e["decode_share"] = e["decode_us"] / step_us if step_us else 0.0
        e["prefill_share"] = e["prefill_us"] / prefill_us if prefill_us else 0.0
        breakdown[op] = e
    return breakdown


def _qualify(res: PerfResult, dev: Device, path: Any) -> None:
    """A warning off the calibrated systems, and the prediction intervals when the parameters
    are a calibration's (the committed one or a file)."""
    meta = params_metadata(path or None) if path is not False else {}
    cal_devices = (meta.get("calibration") or {}).get("devices") or [d for d in DEVICES if DEVICES[d].calibrated]
    res.calibrated_device = dev.name in cal_devices
    if not res.calibrated_device:
        why = ("no published measurements exist yet" if not any(d.arch == dev.arch for d in map(device_for, cal_devices))
               else "its rows are never fitted")
        res.warnings.append(f"{dev.name} is not a calibrated system ({why}): the figures are physics-only "
                            f"predictions from the {'/'.join(cal_devices)} calibration")
    if path is not False and meta.get("intervals"):
        s_iv = interval("speed", res.speed_tsu, dev, res.model, path or None)
        t_iv = interval("ttft", res.ttft_ms, dev, res.model, path or None)
        res.speed_interval, res.ttft_interval = s_iv[:2], t_iv[:2]
        res.distance, res.interval_level = s_iv[2], meta["intervals"]["level"]
