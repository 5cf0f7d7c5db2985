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

Modules: markdown (names, number style, the markdown model), study_sections (sections from a study
and their merge into a report), files (the report, CSV and front files), check (`sweep check`).
"""
from __future__ import annotations

from sweep.report.check import accuracy_settings, check_report
from sweep.report.files import (
    ORDER_DEPENDENT,
    decoder_json_of,
    keep_cross_cpu_figures,
    optimizations_string,
    tt_problem,
    write_csv,
    write_front,
    write_report,
)
from sweep.report.markdown import (
    display_name,
    find_section,
    fmt_ms,
    fmt_percent,
    fmt_speed,
    parse_markdown,
    render_markdown,
    sections,
    table_lines,
)
from sweep.report.study_sections import build_sections, calibration_text, interval_text, rows_for, update_report

__all__ = ["ORDER_DEPENDENT", "accuracy_settings", "build_sections", "calibration_text", "check_report", "decoder_json_of", "display_name",
           "find_section", "fmt_ms", "fmt_percent", "fmt_speed", "interval_text", "keep_cross_cpu_figures", "optimizations_string",
           "parse_markdown", "render_markdown", "rows_for", "sections", "table_lines", "tt_problem", "update_report",
           "write_csv", "write_front", "write_report"]
