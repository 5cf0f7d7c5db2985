"""Calibration of the performance model's global parameters on published markdown tables.

`parse_tables(text)` reads tables in the seed's format (reference/PERF-seed.md): `## ` sections
whose header names the config (`Performance`, `Accuracy`, a section whose header is a full config
string, or any other header = the performance preset), the run settings stated in the section's
text (`Batch_size=32`, `prefill_length is 64k tokens`, `(32K Tokens)` in the header, a document-wide
`maximum generation of 200 tokens`), and tables with Model / Device / Speed (t/s/u) / TTFT (ms)
columns (extra columns such as Top-1 are read and ignored). Cells left empty are skipped; a device
written `150` is read as N150; `(DP=N)` in the Model or Device cell sets data-parallel replicas.

`fit(rows)` fits the global parameters (one set for every model and system: no constant per
system) by robust least squares on log(predicted / published) over every speed and TTFT figure
of the N150, N300 and T3K rows (scipy.optimize.least_squares from fixed starting points:
deterministic). Rows on TG are refused: TG is the performance model's validation set and must be
predicted from physics alone; so are rows on systems marked uncalibrated (Blackhole). Rows of a
model the performance model does not cover (Llama3.2-90B: the vision pipeline) are left out.

`cross_validate(rows, "device" | "model")` refits without each device's (model's) rows and
predicts them: the leave-one-device-out and leave-one-model-out errors, whose residuals set the
prediction intervals (`intervals_from`, split-conformal quantiles of |log residual|).

TTFT figures from the config-string sections (the `lt pareto` export) are read but not fitted by
default: that harness's TTFT is not comparable with the demo's (the seed's row for the very config
of the Performance table reads 55 ms there and 24 ms in the Performance table).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from engine.models.shapes import shape_for
from engine.perf.model import (
    PARAMS_FILE,
    NotCovered,
    Params,
    device_distance,
    half_width,
    load_params_file,
    params_metadata,
    predict,
)
from engine.vocab.devices import DEVICES, Device, normalise_device

# systems never fitted: TG (the model's validation set) and those without published rows (Blackhole)
HELD_BACK = tuple(name for name, d in DEVICES.items() if not d.calibrated)
LOSS, F_SCALE = "soft_l1", 0.1  # robust least squares: residuals beyond ~10% count linearly, not squared
FIT_PARAMS = ("dram_eff", "kv_dram_eff", "prefill_dram_eff", "compute_eff", "softmax_cycles", "decode_op_us", "prefill_op_us",
              "token_us", "user_layer_us", "user_step_us", "prefill_user_ms", "eth_eff", "ccl_us", "ccl_step_us",
              "ccl_prefill_us", "replica_us", "sdpa_pos_ns")
BOUNDS = {  # physical ranges the fit may not leave
    "dram_eff": (0.2, 1.0), "kv_dram_eff": (0.1, 1.0), "prefill_dram_eff": (0.05, 1.0), "compute_eff": (0.05, 1.0),
    "softmax_cycles": (1.0, 20000.0), "decode_op_us": (0.1, 200.0), "prefill_op_us": (0.5, 2000.0),
    "token_us": (1.0, 50000.0), "user_layer_us": (0.01, 200.0), "user_step_us": (0.1, 5000.0),
    "prefill_user_ms": (0.01, 500.0), "eth_eff": (0.05, 1.0),
    # collectives: public TG Llama-70B decode CCL targets are 8-12 us per all-gather and 25-30 us per
    # all-reduce (tt-metal tests/ttnn/unit_tests/operations/ccl/perf/test_ccl_async_perf_TG_llama.py)
    "ccl_us": (1.0, 200.0), "ccl_step_us": (0.01, 50.0), "ccl_prefill_us": (0.5, 1000.0),
    "replica_us": (1.0, 5000.0), "sdpa_pos_ns": (0.01, 100.0),
}


@dataclass
class Row:
    model: str
    device: str
    config: str  # "performance", "accuracy" or a config string
    batch: int = 1
    prefill: int = 128
    decode: int = 200
    dp: int = 1
    speed: float | None = None
    ttft: float | None = None
    section: str = ""
    harness: str = "demo"  # "demo" (simple_text_demo) or "pareto" (lt pareto export)
    line: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        dp = f" (DP={self.dp})" if self.dp > 1 else ""
        sec = self.section if len(self.section) <= 40 else self.section[:37] + "..."
        return f"{self.model} {self.device}{dp} [{sec}]"


@dataclass
class ParseResult:
    rows: list[Row] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(cell: str) -> float | None:
    cell = cell.strip().replace(",", "")
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


_DP = re.compile(r"\(\s*DP\s*=\s*(\d+)\s*\)", re.I)


@dataclass
class _Context:
    """What the headings and prose above a table say about its rows."""

    section: str = ""
    config: str = "performance"
    harness: str = "demo"
    batch: int = 1
    prefill: int = 128
    decode: int = 200

    def heading(self, line: str) -> None:
        level = len(line) - len(line.lstrip("#"))
        title = line[level:].strip()
        self.section, self.batch, self.prefill = title, 1, 128
        if level == 1:
            self.config, self.harness = "performance", "demo"
            return
        low = title.lower()
        if "precision_cfg" in low or "fidelity_cfg" in low:
            self.config, self.harness = title, "pareto"
        elif "accuracy" in low:
            self.config, self.harness = "accuracy", "demo"
        else:
            self.config, self.harness = "performance", "demo"
        k = re.search(r"(\d+)\s*k\s*tokens", low)
        if k:
            self.prefill = int(k.group(1)) * 1024

    def prose(self, line: str) -> None:
        b = re.search(r"batch_size\s*=\s*(\d+)", line, re.I)
        if b:
            self.batch = int(b.group(1))
        pl = re.search(r"prefill_length is (\d+)\s*(k?)", line, re.I)
        if pl:
            self.prefill = int(pl.group(1)) * (1024 if pl.group(2) else 1)


def parse_tables(text: str) -> ParseResult:
    out = ParseResult()
    ctx = _Context()
    m = re.search(r"generation of (\d+) tokens", text)
    if m:
        ctx.decode = int(m.group(1))
    header: list[str] | None = None
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            ctx.heading(line)
            header = None
            continue
        if not line.startswith("|"):
            ctx.prose(line)
            if line:
                header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
        elif not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            _parse_row(cells, header, ctx, no, out)
    return out


def _column(header: list[str], *keys: str) -> int | None:
    """The column whose (lower-case) name holds every key: the first such name; of a name that
    repeats, its last column."""
    col = {name: i for i, name in enumerate(header)}
    return next((i for name, i in col.items() if all(k in name for k in keys)), None)


def _parse_row(cells: list[str], header: list[str], ctx: _Context, no: int, out: ParseResult) -> None:
    """One data row of a Model / Device / Speed / TTFT table into `out` (or a note why not)."""
    im, idv, isp, itt = (_column(header, k) for k in ("model", "device", "speed", "ttft"))
    if im is None or idv is None or (isp is None and itt is None):
        return
    model, dev_cell = cells[im], cells[idv]
    speed = _num(cells[isp]) if isp is not None and isp < len(cells) else None
    ttft = _num(cells[itt]) if itt is not None and itt < len(cells) else None
    dp = 1
    for part in (model, dev_cell):
        d = _DP.search(part)
        if d:
            dp = int(d.group(1))
    model = _DP.sub("", model).strip()
    dev_text = _DP.sub("", dev_cell).strip()
    note = ""
    try:
        device = normalise_device(dev_text)
    except ValueError:
        out.notes.append(f"line {no}: unknown device {dev_text!r}, row skipped")
        return
    if device.lower() != dev_text.lower():
        note = f"device {dev_text!r} read as {device}"
        out.notes.append(f"line {no}: {note}")
    if speed is None and ttft is None:
        out.skipped_empty.append(f"line {no}: {model} {dev_text} [{ctx.section}]")
        return
    out.rows.append(Row(model=model, device=device, config=ctx.config, batch=ctx.batch, prefill=ctx.prefill,
                        decode=ctx.decode, dp=dp, speed=speed, ttft=ttft, section=ctx.section,
                        harness=ctx.harness, line=no, note=note))


def parse_file(path: str | Path) -> ParseResult:
    return parse_tables(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
def _predict(row: Row, params: Params):
    return predict(row.model, row.device, row.config, batch=row.batch, prefill=row.prefill,
                   decode=row.decode, dp=row.dp, params=params)


def errors(rows: Sequence[Row], params: Params, fit_pareto_ttft: bool = False) -> dict:
    """Per-row predictions and percentage errors, MAPE for speed and TTFT, and the worst rows."""
    table = []
    for r in rows:
        res = _predict(r, params)
        e = {"row": r, "speed_pred": res.speed_tsu, "ttft_pred": res.ttft_ms, "speed_err": None, "ttft_err": None,
             "ttft_fitted": r.ttft is not None and (fit_pareto_ttft or r.harness != "pareto")}
        if r.speed:
            e["speed_err"] = 100.0 * (res.speed_tsu - r.speed) / r.speed
        if r.ttft:
            e["ttft_err"] = 100.0 * (res.ttft_ms - r.ttft) / r.ttft
        table.append(e)

    def mape(vals: list[float]) -> float:
        return sum(abs(v) for v in vals) / len(vals) if vals else float("nan")

    sp = [e for e in table if e["speed_err"] is not None]
    tt = [e for e in table if e["ttft_err"] is not None and e["ttft_fitted"]]
    tt_all = [e for e in table if e["ttft_err"] is not None]
    worst_s = max(sp, key=lambda e: abs(e["speed_err"]), default=None)
    worst_t = max(tt, key=lambda e: abs(e["ttft_err"]), default=None)
    return {
        "table": table,
        "mape": {"speed": mape([e["speed_err"] for e in sp]), "ttft": mape([e["ttft_err"] for e in tt]),
                 "ttft_all_rows": mape([e["ttft_err"] for e in tt_all])},
        "counts": {"speed": len(sp), "ttft": len(tt), "ttft_all_rows": len(tt_all)},
        "worst": {
            "speed": None if worst_s is None else {"row": worst_s["row"].label, "published": worst_s["row"].speed,
                                                   "predicted": worst_s["speed_pred"], "err_pct": worst_s["speed_err"]},
            "ttft": None if worst_t is None else {"row": worst_t["row"].label, "published": worst_t["row"].ttft,
                                                  "predicted": worst_t["ttft_pred"], "err_pct": worst_t["ttft_err"]},
        },
    }


def check_calibration_rows(rows: Iterable[Row]) -> None:
    held = [r for r in rows if r.device in HELD_BACK]
    if held:
        raise ValueError(
            f"refusing to fit on {len(held)} row(s) from {'/'.join(sorted({r.device for r in held}))} "
            f"(first: {held[0].label}); TG rows are the performance model's validation set and systems "
            "without published rows are uncalibrated - fit on N150/N300/T3K rows (or mark a system "
            "\"calibrated\" in engine/data/devices.json once it has measurements)"
        )


def covered(row: Row) -> bool:
    """False for rows of a model the performance model refuses (engine.perf.model.NotCovered)."""
    return not shape_for(row.model).not_covered


def _residuals(x, rows: Sequence[Row], base: Params, names: Sequence[str], fit_pareto_ttft: bool):
    prm = base.replace(**{n: float(math.exp(v)) for n, v in zip(names, x)})
    res = []
    for r in rows:
        out = _predict(r, prm)
        if r.speed:
            res.append(math.log(out.speed_tsu / r.speed))
        if r.ttft and (fit_pareto_ttft or r.harness != "pareto"):
            res.append(math.log(out.ttft_ms / r.ttft))
    return res


def fit(rows: Sequence[Row], start: Params | None = None, names: Sequence[str] = FIT_PARAMS,
        fit_pareto_ttft: bool = False, loss: str = LOSS, starts: int = 2, max_nfev: int = 300, tick=None) -> Params:
    """Least-squares fit of the named global parameters (log space, bounded, deterministic:
    scipy.optimize.least_squares, trust-region reflective, from `starts` fixed starting points).

    `loss` "soft_l1" (default) is robust least squares: a residual beyond ~10% (F_SCALE) counts
    linearly, so a few inconsistent published figures cannot drag every global parameter;
    "linear" is plain least squares. `tick()` is called after each start (progress)."""
    if loss not in ("soft_l1", "linear"):
        raise ValueError(f"unknown loss {loss!r}; legal: soft_l1, linear")
    check_calibration_rows(rows)
    rows = [r for r in rows if covered(r)]
    if not rows:
        raise ValueError("no calibration rows to fit")
    import numpy as np
    from scipy.optimize import least_squares

    base = start or Params()
    names = list(names)
    lo = np.log([BOUNDS[n][0] for n in names])
    hi = np.log([BOUNDS[n][1] for n in names])
    x0 = np.clip(np.log([getattr(base, n) for n in names]), lo + 1e-9, hi - 1e-9)

    def fun(x):
        return np.asarray(_residuals(x, rows, base, names, fit_pareto_ttft))

    best_x, best_cost = x0, math.inf
    for xs in [x0, np.clip(x0 - 0.5, lo + 1e-9, hi - 1e-9)][:starts]:
        sol = least_squares(fun, xs, bounds=(lo, hi), method="trf", x_scale=1.0, diff_step=1e-4,
                            loss=loss, f_scale=F_SCALE, xtol=1e-8, ftol=1e-8, gtol=1e-8, max_nfev=max_nfev)
        if float(sol.cost) < best_cost - 1e-12:
            best_x, best_cost = sol.x, float(sol.cost)
        if tick is not None:
            tick()
    return base.replace(**{n: float(math.exp(v)) for n, v in zip(names, best_x)})


# --- cross-validation and prediction intervals -------------------------------------------------
LEVEL = 0.9  # coverage of the prediction intervals
MAIN_STARTS = 1  # the full fit starts from the defaults (a second start 0.5 lower in log space found no better fit)
CV_NFEV = 40  # evaluations per cross-validation refit (one start, from the defaults: no leakage)


def _log_residuals(rows: Sequence[Row], params: Params, fit_pareto_ttft: bool) -> list[tuple[Row, float | None, float | None]]:
    out = []
    for r in rows:
        res = _predict(r, params)
        s = math.log(res.speed_tsu / r.speed) if r.speed else None
        t = math.log(res.ttft_ms / r.ttft) if r.ttft and (fit_pareto_ttft or r.harness != "pareto") else None
        out.append((r, s, t))
    return out


def cross_validate(rows: Sequence[Row], by: str, fit_pareto_ttft: bool = False, loss: str = LOSS,
                   start: Params | None = None, tick=None) -> dict[str, dict]:
    """Leave-one-`by`-out ("device" or "model"): refit without each group's rows and predict
    them. Returns group -> {speed_mape, ttft_mape, n, residuals: [(speed log-res, ttft log-res)]}.
    `tick()` is called after each refit (progress)."""
    rows = [r for r in rows if covered(r)]
    groups = list(dict.fromkeys(getattr(r, by) for r in rows))
    out = {}
    for g in groups:
        train = [r for r in rows if getattr(r, by) != g]
        test = [r for r in rows if getattr(r, by) == g]
        prm = fit(train, start=start or Params(), fit_pareto_ttft=fit_pareto_ttft, loss=loss, starts=1, max_nfev=CV_NFEV,
                  tick=tick)
        res = _log_residuals(test, prm, fit_pareto_ttft)
        sp = [100 * abs(math.exp(s) - 1) for _, s, _ in res if s is not None]
        tt = [100 * abs(math.exp(t) - 1) for _, _, t in res if t is not None]
        out[g] = {"speed_mape": sum(sp) / len(sp) if sp else None,
                  "ttft_mape": sum(tt) / len(tt) if tt else None, "n": len(test),
                  "residuals": [[s, t] for _, s, t in res]}
    return out


def conformal_quantile(values: Sequence[float], level: float = LEVEL) -> float:
    """Split-conformal quantile of |values|: the ceil((n+1) level)-th smallest (the largest when
    that exceeds n)."""
    v = sorted(abs(x) for x in values)
    if not v:
        return float("nan")
    k = min(len(v), math.ceil((len(v) + 1) * level))
    return v[k - 1]


def intervals_from(in_sample: Sequence[tuple], lomo: dict, lodo: dict, level: float = LEVEL) -> dict:
    """Log-space half-widths per metric from the in-sample, leave-one-model-out and
    leave-one-device-out residuals, and the mean distance (engine.perf.model.device_distance) of the
    left-out devices from the remaining ones."""

    out: dict = {"level": level}
    for i, metric in enumerate(("speed", "ttft")):
        pools = {"in_sample": [x[i + 1] for x in in_sample],
                 "lomo": [r[i] for g in lomo.values() for r in g["residuals"]],
                 "lodo": [r[i] for g in lodo.values() for r in g["residuals"]]}
        out[metric] = {k: conformal_quantile([x for x in v if x is not None], level) for k, v in pools.items()}
    devs = list(lodo)
    out["lodo_distance"] = (sum(device_distance(d, [o for o in devs if o != d]) for d in devs) / len(devs)
                            if len(devs) > 1 else 1.0)
    return out


# --- between-config error ----------------------------------------------------------------------
def config_pairs(rows: Sequence[Row], params: Params, metric: str, fit_pareto_ttft: bool = False
                 ) -> list[tuple[float, float]]:
    """(|predicted log ratio|, |its error|) of every pair of rows of one setting that differ only in
    config: same model, device, batch, prefill, decode, DP and harness. The error of the predicted
    ratio log(pred_i / pred_j) - log(pub_i / pub_j) is the part of the model's error NOT common to
    the two configs: a per-model or per-device offset (what the absolute interval is mostly made
    of) cancels in it. The figures are those the fit uses: the `lt pareto` harness's TTFTs only with
    `fit_pareto_ttft` (they scatter 45-73 ms over configs the demo times alike)."""
    i = ("speed", "ttft").index(metric)
    groups: dict[tuple, list[tuple[str, float, float]]] = {}
    for r in rows:
        pub = (r.speed, r.ttft)[i]
        if not pub or not covered(r) or (i == 1 and r.harness == "pareto" and not fit_pareto_ttft):
            continue
        res = _predict(r, params)
        pred = (res.speed_tsu, res.ttft_ms)[i]
        groups.setdefault((r.model, r.device, r.batch, r.prefill, r.decode, r.dp, r.harness), []).append(
            (r.config, math.log(pred), math.log(pub)))
    out = []
    for g in groups.values():
        for a in range(len(g)):
            for b in range(a):
                if g[a][0] != g[b][0]:
                    d = g[a][1] - g[b][1]
                    out.append((abs(d), abs(d - (g[a][2] - g[b][2]))))
    return out


def between_config_fit(pairs: Sequence[tuple[float, float]], level: float = LEVEL) -> dict:
    """The `level` quantile of the between-config error as a line in the predicted difference:
    |error of log(pred_i / pred_j)| <= a + b |log(pred_i / pred_j)| for a `level` share of the pairs
    (linear quantile regression, a, b >= 0: the pinball loss minimised exactly as a linear program,
    scipy.optimize.linprog / HiGHS; deterministic). A config predicted equal to another is off by
    up to `a`; a predicted difference is off by up to a further share `b` of itself (the model
    exaggerates or understates differences between configs). Returns {a, b, pairs, coverage}."""
    import numpy as np
    from scipy.optimize import linprog

    if len(pairs) < 3:
        return {"a": float("nan"), "b": float("nan"), "pairs": len(pairs), "coverage": float("nan")}
    d = np.array([p[0] for p in pairs])
    e = np.array([p[1] for p in pairs])
    n = len(pairs)
    # minimise sum(level * u + (1 - level) * v) subject to a + b d + u - v = e, all >= 0
    c = np.r_[0.0, 0.0, np.full(n, level), np.full(n, 1.0 - level)]
    a_eq = np.c_[np.ones(n), d, np.eye(n), -np.eye(n)]
    sol = linprog(c, A_eq=a_eq, b_eq=e, bounds=[(0, None)] * (2 + 2 * n), method="highs")
    a, b = (float(x) for x in sol.x[:2])
    return {"a": a, "b": b, "pairs": n, "coverage": float(np.mean(e <= a + b * d + 1e-12))}


@lru_cache(maxsize=8)
def _between_terms(path: str) -> dict:
    data = load_params_file(path)[1]
    rows = [Row(**r) for r in data.get("rows") or ()]
    level = (data.get("intervals") or {}).get("level", 0.9)
    params = Params.from_dict(data["params"])
    fpt = bool((data.get("calibration") or {}).get("fit_pareto_ttft", False))
    return {m: between_config_fit(config_pairs(rows, params, m, fpt), level) for m in ("speed", "ttft")}


def between_terms(metric: str, path: str | Path | None = None) -> dict | None:
    """{a, b, pairs, coverage} of the between-config error of `metric` (between_config_fit over the calibration rows stored in the parameter file, with its fitted
    parameters: computed when first asked, deterministic), or None without a calibration."""
    p = Path(path) if path else PARAMS_FILE
    if not p.exists() or not params_metadata(p).get("intervals"):
        return None
    t = _between_terms(str(p.resolve())).get(metric)
    return t if t and math.isfinite(t["a"]) else None


def between_interval(metric: str, value: float, reference: float, device: str | Device, model: str,
                     path: str | Path | None = None) -> tuple[float, float] | None:
    """(low, high) of `metric` for a config predicted at `value`, GIVEN the true figure of a
    reference config of the same model on the same device (predicted at `reference`): the
    interval of the ratio between the two configs, drawn around `value`. Half-width in log space
    a + b |log(value / reference)| (between_terms: a level-quantile fit of the errors of the
    predicted ratios between configs of one published setting), scaled like the absolute interval
    for a system off the calibration data (interval's distance term; an unseen model does not widen
    it: the leave-one-model-out error is an offset common to the model's configs). It leaves out
    the error common to every config of the model on the device, which `interval` includes (the
    plots draw the reference itself without a bar: its ratio to itself is 1). None without a
    calibration."""
    t = between_terms(metric, path)
    if t is None or not (value > 0 and reference > 0):
        return None
    h = t["a"] + t["b"] * abs(math.log(value / reference))
    w = half_width(metric, device, model, path)
    if w is not None and w[2] > 0 and w[1] > 0:
        h *= w[0] / w[1]  # widen with the distance from the calibrated systems, as the absolute interval does
    return value * math.exp(-h), value * math.exp(h)


def _read_sources(paths: Sequence[str | Path]) -> tuple[list[Row], list[str], list[str], list[dict]]:
    """Every table row of the files, the empty rows skipped, parse notes, and each file's digest."""
    rows: list[Row] = []
    skipped: list[str] = []
    notes: list[str] = []
    sources = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        parsed = parse_tables(text)
        rows += parsed.rows
        skipped += parsed.skipped_empty
        notes += [f"{Path(p).name}: {n}" for n in parsed.notes]
        sources.append({"file": _display_path(p), "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return rows, skipped, notes, sources


def _metadata(sources, used, rep, by_device, fit_pareto_ttft, held, refused, skipped, notes, loss) -> dict:
    """The parameter file's `calibration` record: what was fitted on, how, and how well."""
    return {
        "source": ", ".join(s["file"] for s in sources),
        "sources": sources,
        "date": _dt.date.today().isoformat(),
        "rows_used": len(used),
        "devices": list(dict.fromkeys(r.device for r in used)),
        "models": list(dict.fromkeys(r.model for r in used)),
        "speed_figures": rep["counts"]["speed"],
        "ttft_figures": rep["counts"]["ttft"],
        "ttft_figures_read": rep["counts"]["ttft_all_rows"],
        "fit_pareto_ttft": fit_pareto_ttft,
        "mape": rep["mape"],
        "mape_by_device": by_device,
        "worst": rep["worst"],
        "ignored_held_back": len(held),
        "refused": len(refused),
        "skipped_empty": skipped,
        "notes": notes,
        "loss": loss,
        "method": f"{'robust (soft-L1, scale 0.1) ' if loss == 'soft_l1' else ''}least squares on "
                  "log(predicted/published) of every speed and TTFT figure; scipy.optimize.least_squares "
                  "(trf, bounded, log-space parameters) from the defaults; deterministic",
    }


# --------------------------------------------------------------------------------------------
def calibrate(paths: Sequence[str | Path], out: str | Path | None = PARAMS_FILE, fit_pareto_ttft: bool = False,
              start: Params | None = None, loss: str = LOSS, cross_validation: bool = True) -> dict:
    """Parse tables, drop held-back systems and models the model does not cover, fit, cross-validate
    (leave one device out, leave one model out), and (if `out`) write the parameter file."""
    rows, skipped, notes, sources = _read_sources(paths)
    held = [r for r in rows if r.device in HELD_BACK]
    if held:
        notes.append(f"ignored {len(held)} row(s) on never-fitted systems "
                     f"{'/'.join(sorted({r.device for r in held}))} (validation only)")
    refused = [r for r in rows if r.device not in HELD_BACK and not covered(r)]
    for m in dict.fromkeys(r.model for r in refused):
        notes.append(f"left out {sum(r.model == m for r in refused)} {m} row(s): {shape_for(m).not_covered}")
    used = [r for r in rows if r.device not in HELD_BACK and covered(r)]
    if start is None:
        start = Params()
    from engine.progress import bar

    refits = len({r.device for r in used}) + len({r.model for r in used}) if cross_validation else 0
    steps = bar(total=MAIN_STARTS + refits, desc="perf calibrate (fit, then leave-one-out refits)", unit="fit")
    tick = lambda: steps.update(1)  # noqa: E731
    params = fit(used, start=start, fit_pareto_ttft=fit_pareto_ttft, loss=loss, starts=MAIN_STARTS, tick=tick)
    rep = errors(used, params, fit_pareto_ttft)
    by_device = {d: errors([r for r in used if r.device == d], params, fit_pareto_ttft)["mape"]
                 for d in dict.fromkeys(r.device for r in used)}
    meta = _metadata(sources, used, rep, by_device, fit_pareto_ttft, held, refused, skipped, notes, loss)
    data = {
        "params": params.to_dict(),
        "fitted": list(FIT_PARAMS),
        "fixed": {k: v for k, v in params.to_dict().items() if k not in FIT_PARAMS},
        "calibration": meta,
    }
    if cross_validation:
        lodo = cross_validate(used, "device", fit_pareto_ttft, loss, tick=tick)
        lomo = cross_validate(used, "model", fit_pareto_ttft, loss, tick=tick)
        strip = lambda cv: {g: {k: v for k, v in e.items() if k != "residuals"} for g, e in cv.items()}
        meta["lodo"], meta["lomo"] = strip(lodo), strip(lomo)
        meta["cv_method"] = (f"each group's rows predicted by a refit without them (one start from the defaults, "
                             f"at most {CV_NFEV} evaluations)")
        data["intervals"] = intervals_from(_log_residuals(used, params, fit_pareto_ttft), lomo, lodo)
    steps.close()
    data["rows"] = [r.to_dict() for r in used]
    if out:
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
    return {"data": data, "report": rep, "held_back": held, "refused": refused}


def _display_path(p: str | Path) -> str:
    path = Path(p).resolve()
    root = PARAMS_FILE.parents[2]
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(p)


def rows_from_params(path: str | Path | None = None) -> list[Row]:
    data = json.loads(Path(path or PARAMS_FILE).read_text())
    return [Row(**r) for r in data.get("rows", [])]


# --- the prediction table (`sweep perf table`) --------------------------------------------------
SEED_FILE = PARAMS_FILE.parents[2] / "reference" / "PERF-seed.md"
LARGE_MODELS = ("Llama3.1-70B", "Llama3.2-90B", "Qwen2.5-72B")  # ran only on T3K / TG


@dataclass
class TableRow:
    model: str
    device: str
    dp: int
    speed_pred: float | None
    ttft_pred: float | None
    speed_pub: float | None = None
    ttft_pub: float | None = None
    kind: str = "calibration"  # calibration | validation (TG: never fitted) | prediction (no published figure) | refused
    fits: bool = True
    speed_pi: tuple[float, float] | None = None
    note: str = ""  # why a refused row has no prediction

    @property
    def device_label(self) -> str:
        return f"{self.device} (DP={self.dp})" if self.dp > 1 else self.device

    @staticmethod
    def _err(pred: float | None, pub: float | None) -> float | None:
        return None if not pub or pred is None else 100.0 * (pred - pub) / pub

    @property
    def speed_err(self) -> float | None:
        return self._err(self.speed_pred, self.speed_pub)

    @property
    def ttft_err(self) -> float | None:
        return self._err(self.ttft_pred, self.ttft_pub)


@dataclass
class TableSection:
    title: str
    config: str
    batch: int
    prefill: int
    decode: int
    harness: str
    rows: list[TableRow] = field(default_factory=list)


def published_rows(seed: str | Path | None = None) -> list[Row]:
    """Rows of a seed-format file (default: the repo's reference copy, else the calibration rows)."""
    if seed:
        return parse_file(seed).rows
    if SEED_FILE.exists():
        return parse_file(SEED_FILE).rows
    return rows_from_params()


def _table_row(model: str, device: str, dp: int, sec: TableSection, params: Params | None, kind: str,
               speed: float | None = None, ttft: float | None = None) -> TableRow:
    try:
        res = predict(model, device, sec.config, batch=sec.batch, prefill=sec.prefill, decode=sec.decode,
                      dp=dp, params=params)
    except NotCovered as exc:
        return TableRow(model, device, dp, None, None, speed, ttft, "refused", note=str(exc))
    return TableRow(model, device, dp, res.speed_tsu, res.ttft_ms, speed, ttft, kind, res.fits, res.speed_interval)


def prediction_table(rows: Sequence[Row] | None = None, params: Params | None = None,
                     extras: bool = True) -> list[TableSection]:
    """Every published model x device row with its prediction, section by section (TG rows, if a
    file has them, are predicted and compared, never fitted); with `extras`, pure predictions for
    the 70B-class models on T3K and TG and data-parallel (DP=N) rows."""
    rows = list(rows) if rows is not None else published_rows()
    single_chip = {r.model for r in rows if r.device == "N150" and r.dp == 1}
    sections: dict[tuple, TableSection] = {}
    for r in rows:
        key = (r.section, r.config, r.batch, r.prefill)
        sec = sections.get(key)
        if sec is None:
            sec = sections[key] = TableSection(r.section, r.config, r.batch, r.prefill, r.decode, r.harness)
        kind = "validation" if r.device in HELD_BACK else "calibration"
        sec.rows.append(_table_row(r.model, r.device, r.dp, sec, params, kind, r.speed, r.ttft))
    if extras:
        for sec in sections.values():
            if sec.harness != "demo" or sec.prefill < 128 or "32k" in sec.title.lower():
                continue
            have = {(t.model, t.device, t.dp) for t in sec.rows}
            wanted: list[tuple[str, str, int]] = []
            for m in LARGE_MODELS:
                wanted += [(m, "T3K", 1), (m, "TG", 1)]
            for m in dict.fromkeys(t.model for t in sec.rows if t.model not in LARGE_MODELS):
                replica = 1 if m in single_chip else 2
                wanted += [(m, "T3K", 8 // replica), (m, "TG", 32 // replica)]
            for m, dev, dp in wanted:
                if (m, dev, dp) not in have:
                    sec.rows.append(_table_row(m, dev, dp, sec, params, "prediction"))
    return list(sections.values())


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _fmt_err(v: float | None) -> str:
    return "" if v is None else f"{v:+.1f}"


def table_summary(sections: Sequence[TableSection]) -> str:
    """Mean absolute error of the published rows by system and kind (calibration / validation)."""
    by: dict[tuple[str, str], list] = {}
    for sec in sections:
        for t in sec.rows:
            if t.kind in ("calibration", "validation") and (t.speed_err is not None or t.ttft_err is not None):
                e = by.setdefault((t.kind, t.device), [[], []])
                if t.speed_err is not None:
                    e[0].append(abs(t.speed_err))
                if t.ttft_err is not None and sec.harness == "demo":
                    e[1].append(abs(t.ttft_err))
    parts = []
    for (kind, dev), (sp, tt) in by.items():
        m = lambda v: f"{sum(v) / len(v):.1f}%" if v else "n/a"
        parts.append(f"{dev} ({kind}, {len(sp)} speed / {len(tt)} TTFT figures): speed {m(sp)}, TTFT {m(tt)}")
    return "Mean absolute error of the rows above (TTFT of the demo sections): " + "; ".join(parts) + "." if parts else ""


def format_prediction_table(sections: Sequence[TableSection], markdown: bool = True, note: str = "") -> str:
    head = ["Model", "Device", "Speed (t/s/u)", "90% PI", "Published", "Err (%)", "TTFT (ms)", "Published", "Err (%)"]
    out: list[str] = ["# Predicted performance (engine/perf/model.py) beside the published figures", ""]
    refused: dict[str, str] = {}
    for sec in sections:
        out.append(f"## {sec.title}")
        out.append("")
        dp_note = " (per DP group)" if any(t.dp > 1 for t in sec.rows) else ""
        out.append(f"Batch {sec.batch}{dp_note}, prefill {sec.prefill} tokens, {sec.decode} decode iterations. "
                   "Rows without a published figure are pure predictions; TG is never fitted.")
        out.append("")
        body = []
        for t in sec.rows:
            flag = "" if t.fits else " (does not fit in DRAM)"
            if t.kind == "refused":
                refused.setdefault(t.model, t.note)
                body.append([t.model, t.device_label, "not covered", "", _fmt(t.speed_pub, 1), "", "",
                             _fmt(t.ttft_pub, 1 if t.ttft_pub and t.ttft_pub % 1 else 0), ""])
                continue
            pi = f"{t.speed_pi[0]:.1f}-{t.speed_pi[1]:.1f}" if t.speed_pi else ""
            body.append([t.model, t.device_label + flag, _fmt(t.speed_pred, 1), pi, _fmt(t.speed_pub, 1),
                         _fmt_err(t.speed_err), _fmt(t.ttft_pred, 0),
                         _fmt(t.ttft_pub, 1 if t.ttft_pub and t.ttft_pub % 1 else 0), _fmt_err(t.ttft_err)])
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
        if markdown:
            out.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
            for r in body:
                out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        else:
            out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
            for r in body:
                out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        out.append("")
    for why in refused.values():
        out += [f"Not covered: {why}", ""]
    summary = table_summary(sections)
    if summary:
        out += [summary, ""]
    if note:
        out.append(note)
    return "\n".join(out).rstrip() + "\n"
