"""The files of `sweep report`: the markdown report, the points CSV and the front export."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.vocab.config import Config, ModelConfig
from sweep.pareto import Analysis, Point
from sweep.report.study_sections import build_sections, update_report


# --- files -------------------------------------------------------------------------------------
def n_layers_of(model: str) -> int | None:
    """Decoder layer count of a registry model from its metadata (for decoder JSON), if known."""
    try:
        from engine.models.loaders import model_spec

        return int(model_spec(model).n_layers)
    except Exception:  # noqa: BLE001 - the record's decoder JSON is the main source; this is a fallback
        return None


def decoder_json_of(point: Point) -> dict | None:
    """tt-metal decoder JSON of a point: the record's, else built from its config string; None
    when a layer uses a setting tt-metal lacks (hifi3, fp32, exact)."""
    if point.record.decoder_json:
        return point.record.decoder_json
    n = n_layers_of(point.record.model)
    if n is None:
        return None
    try:
        return ModelConfig.parse(point.config, n, point.record.model).to_decoder_json()
    except ValueError:
        return None


def optimizations_string(point: Point) -> str:
    """tt-metal's --optimizations string: the config string of the (base) layer config."""
    head = point.config.partition("; decoders = {")[0]
    return str(Config.parse(head))


def tt_problem(point: Point) -> str | None:
    """Why a point's config cannot run on tt-metal (a setting it lacks), or None."""
    head, sep, _ = point.config.partition("; decoders = {")
    try:
        Config.parse(head).to_tt()
        if sep:
            n = n_layers_of(point.record.model)
            if n is not None:
                ModelConfig.parse(point.config, n, point.record.model).to_decoder_json()
    except ValueError as exc:
        return str(exc)
    return None


#: points.csv columns computed from fp32 log-softmax values (the engine's and the fp32 reference's),
#: whose normaliser is an fp32 sum over the vocabulary in the order of the CPU's vector kernels
#: (docs/NUMERICS.md, "Reproducibility across CPUs"). Column -> (scale, bound): two CPUs put the
#: figure at most `bound` x T apart, T = engine.accuracy.evaluator.cross_cpu_tolerance(vocab), on that scale
#: ("log": ln of the figure, a relative bound; "abs": the figure itself). Every log-probability
#: moves by at most T between two CPUs, so: a mean KLD, and each per-position KLD (hence the
#: percentile kld_p99) by T nats; its standard error by T / sqrt(n - 1) <= T; ln ppl and ln
#: ref_ppl by T; dp = q - p (target probabilities) by T (q + p) <= 2T, so rms_dp (percent) by 200 T.
ORDER_DEPENDENT = {"kld": ("abs", 1.0), "kld_se": ("abs", 1.0), "kld_p99": ("abs", 1.0),
                   "ppl": ("log", 1.0), "ref_ppl": ("log", 1.0), "rms_dp": ("abs", 200.0)}


def write_csv(analysis: Analysis, path: str | Path) -> Path:
    """Write `analysis.frame()` (one row per COMPLETE trial) to `path`, e.g. reports/<study>/points.csv.

    The ORDER_DEPENDENT columns (kld, kld_se, kld_p99, ppl, ref_ppl, rms_dp) are the only figures
    that differ between CPUs: another machine makes them within the cross-CPU tolerance of the
    committed ones (the defaults KLD by 7.7e-6 nats, 5.9e-4 relative, between AVX2 and AVX-512 kernels), every
    other column is the same bits on every CPU. When `path` already holds the same trial (same
    number and config), a new figure within that tolerance of the file's keeps the file's digits
    (the two are the same figure up to summation order), so rerunning a study on another CPU does not
    rewrite a committed CSV; a figure outside it (the engine, the model or the text changed) is written
    anew. Rounding cannot do this: a figure within the tolerance of a rounding boundary still flips
    its last printed digit between CPUs."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = analysis.frame()
    if path.is_file():
        try:
            old = pd.read_csv(path)  # round-trip exact: pandas writes and reads the shortest repr
        except (ValueError, pd.errors.ParserError):
            old = None
        if old is not None:
            df = keep_cross_cpu_figures(df, old)
    df.to_csv(path, index=False)
    return path


def keep_cross_cpu_figures(new, old):
    """`new` (a points frame) with each ORDER_DEPENDENT cell replaced by `old`'s cell of the same
    trial (same number and config) where the two are within the cross-CPU tolerance."""
    from engine.accuracy.evaluator import cross_cpu_tolerance
    from engine.models.loaders import model_spec

    need = {"trial", "config", "model"}
    if not need <= set(old.columns) or not need <= set(new.columns):
        return new
    prev = {(int(r["trial"]), str(r["config"])): r for r in old.to_dict("records")}
    out = new.copy()
    tol: dict[str, float] = {}
    for i, r in enumerate(new.to_dict("records")):
        o = prev.get((int(r["trial"]), str(r["config"])))
        if o is None or str(o.get("model")) != str(r["model"]):
            continue
        if r["model"] not in tol:
            try:
                tol[r["model"]] = cross_cpu_tolerance(model_spec(r["model"]).vocab)
            except Exception:  # a model whose vocabulary is unknown here: write the figures anew
                tol[r["model"]] = 0.0
        for col, (scale, bound) in ORDER_DEPENDENT.items():
            if col not in new.columns or col not in old.columns:
                continue
            a, b = r[col], o[col]
            try:
                a, b = float(a), float(b)
            except (TypeError, ValueError):
                continue
            if not (math.isfinite(a) and math.isfinite(b)):
                continue
            if scale == "log":
                if a <= 0 or b <= 0:
                    continue
                diff = abs(math.log(a) - math.log(b))
            else:
                diff = abs(a - b)
            if diff <= bound * tol[r["model"]]:
                out.iat[i, out.columns.get_loc(col)] = b
    return out


def write_front(analysis: Analysis, out_dir: str | Path) -> list[Path]:
    """For every front point (study front and each device's Top-1/speed front): `<n>.json`
    (tt-metal decoder JSON) and a line in `optimizations.txt`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.json"):  # a previous run's front
        if old.stem.isdigit():
            old.unlink()
    written = []
    lines = [
        f"# Front of study {analysis.info.name} ({analysis.info.model}): trial number, devices whose"
        " Top-1/speed front holds it ('all' = front of all study objectives), --optimizations string.",
        "# Per-layer configs: the string is the base layer config; run them with the decoder JSON <n>.json.",
    ]
    for n in analysis.front_numbers():
        p = analysis.point(n)
        where = [d for d, df in analysis.devices.items() if n in df.front] + (["all"] if n in analysis.front else [])
        dj = decoder_json_of(p)
        if dj is not None:
            f = out_dir / f"{n}.json"
            f.write_text(json.dumps(dj, indent=2) + "\n")
            written.append(f)
        per_layer = "; decoders = {" in p.config
        problem = tt_problem(p)
        suffix = f"  # per-layer: use {n}.json" if per_layer and dj is not None else ""
        if problem:
            suffix = f"  # NOT runnable on tt-metal: {problem}"
        lines.append(f"{n}\t{','.join(where)}\t{optimizations_string(p)}{suffix}")
    f = out_dir / "optimizations.txt"
    f.write_text("\n".join(lines) + "\n")
    written.append(f)
    return written


@dataclass
class ReportFiles:
    report: Path
    csv: Path
    front: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)


def write_report(analysis: Analysis, out: str | Path, csv: str | Path | None = None,
                 front_dir: str | Path | None = None, configs: str = "all") -> ReportFiles:
    """`sweep report`: update the markdown report, write the CSV and the front export."""
    out = Path(out)
    secs = build_sections(analysis, configs)
    existing = out.read_text() if out.exists() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(update_report(existing, secs))
    base = out.parent / analysis.info.name
    csv_path = write_csv(analysis, csv or base / "points.csv")
    front = write_front(analysis, front_dir or base / "front")
    return ReportFiles(out, csv_path, front, [s.header for s in secs])
