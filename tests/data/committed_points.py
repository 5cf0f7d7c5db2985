"""TEST FIXTURE: an Analysis of the committed lt-pareto results (reports/lt-pareto/points.csv),
for tests and the README screenshot that should show the real numbers, not invented ones."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from engine.models.loaders import model_spec
from engine.vocab.config import ModelConfig
from sweep.pareto import Point, StudyInfo, analyze
from sweep.records import TrialRecord

ROOT = Path(__file__).resolve().parents[2]
POINTS = ROOT / "reports" / "lt-pareto" / "points.csv"


def committed_analysis(path: Path = POINTS, objectives=("top1", "top5", "speed:N150", "ttft:N150")):
    df = pd.read_csv(path)
    devices = [c.split(":", 1)[1] for c in df.columns if c.startswith("speed:")]
    n_layers = model_spec(df["model"].iloc[0]).n_layers
    points = []
    for r in df.to_dict("records"):
        mc = ModelConfig.parse(r["config"], n_layers, r["model"])
        rec = TrialRecord(
            config=r["config"], model=r["model"], top1=r["top1"], top5=r["top5"],
            top1_ci=(r["top1_lo"], r["top1_hi"]), top5_ci=(r["top5_lo"], r["top5_hi"]), kld=r["kld"],
            ppl=r["ppl"], ref_ppl=r["ref_ppl"], tokens=int(r["tokens"]),
            speed={d: r[f"speed:{d}"] for d in devices if not math.isnan(r[f"speed:{d}"])},
            ttft={d: r[f"ttft:{d}"] for d in devices if not math.isnan(r[f"ttft:{d}"])},
            wall_s=r.get("wall_s", 0.0), reused_from=r["reused_from"] if isinstance(r["reused_from"], str) else None,
            decoder_json=mc.to_decoder_json(),
        )
        points.append(Point(int(r["trial"]), rec, {}, bool(r["feasible"])))
    info = StudyInfo("lt-pareto", points[0].record.model, devices, list(objectives),
                     {"eval": {"prefill": 512, "decode": 511}, "perf": {"batch": 1, "prefill": 128, "decode": 200}}, "")
    return analyze(points=points, info=info)
