"""The files of `sweep report`: the markdown report, the points CSV and the front export."""
from __future__ import annotations

import json
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


def write_csv(analysis: Analysis, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    analysis.frame().to_csv(path, index=False)
    return path


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
