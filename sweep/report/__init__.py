"""Seed-format markdown reports (PERF.md), the points CSV and the front export.

A report is the seed's structure (reference/PERF-seed.md): `## Performance` and `## Accuracy`
(the model's presets, only where the study measured them), then one `## precision_cfg = {...},
fidelity_cfg = {...}` section per config, each with the 6-column table

    | Model | Device | Top-1 (%) | Top-5 (%) | Speed (t/s/u) | TTFT (ms) |

one row per device, whole percents, one decimal for speed, whole ms. Under each table one
`Notes (<Model>): ...` line per model says that speed/TTFT are performance-model predictions (and
what the model was calibrated on) and how accuracy was measured (`512-token prefill + 511
teacher-forced decode steps`), which `sweep check` reads back.

Ownership: a (section header, model) pair. Regenerating a report replaces this model's rows and
notes line in sections with the same header (case-insensitive) and keeps everything else: other
models' rows, other sections, prose. One PERF.md can so hold several models and studies.

The markdown parser (`parse_markdown`, `Block.table`) is also what `sweep check` uses.

Modules: markdown (names, number style, the markdown model), sections (sections from a study and
their merge into a report), files (the report, CSV and front files), check (`sweep check`).
"""
from __future__ import annotations

from sweep.report.check import check_report
from sweep.report.files import decoder_json_of, optimizations_string, tt_problem, write_report
from sweep.report.markdown import display_name, parse_markdown
from sweep.report.sections import calibration_text, interval_text

__all__ = ["calibration_text", "check_report", "decoder_json_of", "display_name", "interval_text", "optimizations_string",
           "parse_markdown", "tt_problem", "write_report"]
