"""A report's sections from a study (`build_sections`) and their merge into an existing report
(`update_report`): rows, notes lines and interval texts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from engine.vocab.config import Config, accuracy, performance, resolve
from sweep.pareto import Analysis, Point, records_by_config
from sweep.report.markdown import (
    COLUMNS,
    CONFIG_HEADING,
    DEFAULT_EVAL,
    DEFAULT_PERF,
    NOTE_RE,
    PREAMBLE,
    Block,
    display_name,
    fmt_ms,
    fmt_percent,
    fmt_speed,
    norm_header,
    parse_markdown,
    render_markdown,
    table_lines,
)


# --- sections from a study -------------------------------------------------------------------------
@dataclass
class ReportSection:
    """What one study contributes to one section: this model's rows and its notes line."""

    header: str
    model: str  # display name (the Model column)
    rows: list[list[str]]
    note: str  # the text after "Notes (<model>): "
    intro: str = ""  # printed under the header only when the section is created
    trial: int | None = None


def _get(m, *keys, default=None):
    cur = m
    for k in keys:
        if isinstance(cur, Mapping) and k in cur:
            cur = cur[k]
        elif hasattr(cur, k):
            cur = getattr(cur, k)
        else:
            return default
    return cur


def _settings(spec, defaults: Mapping[str, int], keys: Sequence[str]) -> dict:
    """The integer settings `defaults` names, read from the first of `keys` the spec has."""
    out = dict(defaults)
    for key in keys:
        sub = _get(spec, key)
        if sub is not None:
            for k in out:
                v = _get(sub, k)
                if v is not None:
                    out[k] = int(v)
            break
    return out


def eval_settings(spec) -> dict:
    """prefill/decode of the accuracy evaluation from a study spec (dict or object); seed defaults."""
    return _settings(spec, DEFAULT_EVAL, ("eval", "evaluation", "accuracy"))


def perf_settings(spec) -> dict:
    """batch/prefill/decode of the speed predictions from a study spec; the seed's performance runs."""
    return _settings(spec, DEFAULT_PERF, ("perf", "performance", "speed"))


def calibration_text(analysis: Analysis) -> str:
    note = analysis.info.perf_calibration
    if not note:
        try:
            from engine.perf.model import calibration_note

            note = calibration_note()
        except Exception:  # noqa: BLE001 - the perf model may be absent; say so rather than invent
            note = "calibration unknown"
    return " ".join(str(note).split())


def note_text(analysis: Analysis, point: Point, config_text: str | None = None) -> str:
    ev, pf = eval_settings(analysis.info.spec), perf_settings(analysis.info.spec)
    r = point.record
    calib = calibration_text(analysis).rstrip(". ")
    parts = [
        f"Speed and TTFT are performance-model predictions, not measurements (batch {pf['batch']},"
        f" {pf['prefill']}-token prompt, {pf['decode']} generated tokens; source: {calib}).",
        f"Accuracy: {ev['prefill']}-token prefill + {ev['decode']} teacher-forced decode steps"
        f"{f' in each of {r.windows} windows' if r.windows > 1 else ''} vs fp32 reference"
        f" ({r.tokens} scored; Top-1 95% CI {r.top1_ci[0]:.1f}-{r.top1_ci[1]:.1f}%{_window_spread(r)}).",
        f"Study {analysis.info.name}, trial {point.number}.",
    ]
    iv = interval_text(point, analysis.info.devices)
    if iv:
        parts.insert(1, iv)
    if config_text:
        parts.append(f"Config: {config_text}.")
    return " ".join(parts)


def interval_text(point: Point, devices: Sequence[str]) -> str:
    """The performance model's prediction interval of each device's speed and TTFT ("" without one)."""
    try:
        from engine.perf.model import interval, params_metadata
    except ImportError:
        return ""
    level = (params_metadata().get("intervals") or {}).get("level")
    parts = []
    for d in devices:
        r = point.record
        sp, tt = r.speed.get(d), r.ttft.get(d)
        try:
            s_iv = interval("speed", sp, d, r.model) if sp else None
            t_iv = interval("ttft", tt, d, r.model) if tt else None
        except ValueError:  # a device the table no longer knows
            continue
        if s_iv and t_iv:
            parts.append(f"{d} {s_iv[0]:.1f}-{s_iv[1]:.1f} t/s/u, {t_iv[0]:.0f}-{t_iv[1]:.0f} ms")
    if not parts or not level:
        return ""
    return f"{100 * level:.0f}% prediction intervals (calibration residuals): " + "; ".join(parts) + "."


def _window_spread(r) -> str:
    """`; per-window Top-1 71.2-74.8%, sd 1.3` for multi-window trials, else empty."""
    w = list(getattr(r, "top1_windows", None) or [])
    if len(w) < 2:
        return ""
    import statistics

    return f"; per-window Top-1 {min(w):.1f}-{max(w):.1f}%, sd {statistics.stdev(w):.1f}"


def rows_for(point: Point, devices: Sequence[str]) -> list[list[str]]:
    r, name = point.record, display_name(point.record.model)
    return [[name, d, fmt_percent(r.on(d)["top1"]), fmt_percent(r.on(d)["top5"]), fmt_speed(r.speed.get(d)),
             fmt_ms(r.ttft.get(d))] for d in devices]  # each device's own accuracy (tensor-parallel rounding)


PRESET_INTRO = {
    "Performance": "Each model's `performance` preset (tt-metal's default optimizations); the exact config is in its notes line.",
    "Accuracy": "Each model's `accuracy` preset; the exact config is in its notes line.",
}


def build_sections(analysis: Analysis, configs: str = "all") -> list[ReportSection]:
    """Performance, Accuracy (only when measured), then one section per config in trial order.
    `configs`: "all" configs, or only those on a "front" (the study's or any device's)."""
    model = analysis.info.model
    devices = analysis.info.devices
    name = display_name(model)
    by_cfg = records_by_config(analysis.points)
    out = []
    for header, preset in (("Performance", performance(model)), ("Accuracy", accuracy(model))):
        p = by_cfg.get(str(preset))
        if p is not None:
            out.append(ReportSection(header, name, rows_for(p, devices), note_text(analysis, p, str(preset)),
                                     PRESET_INTRO[header], p.number))
    keep = set(analysis.front_numbers()) if configs == "front" else None
    listed_as_preset = _preset_only_configs(analysis.info.spec, model)
    for cfg, p in by_cfg.items():
        if keep is not None and p.number not in keep or cfg in listed_as_preset:
            continue
        out.append(ReportSection(cfg, name, rows_for(p, devices), note_text(analysis, p), "", p.number))
    return out


def _preset_only_configs(spec: dict, model: str) -> set[str]:
    """Configs a study file lists by preset name (`configs = [..., "accuracy"]`): they get only
    their `## Performance` / `## Accuracy` section, so the config sections stay those listed as
    config strings (for lt-pareto, exactly the seed's 12)."""
    space = spec.get("space") or {}
    raw = space.get("configs") or []
    names = {str(x).strip().lower() for x in raw}
    base = resolve(str(space.get("base", "defaults")), model)
    listed = {str(Config.parse(str(x), base)) for x in raw if str(x).strip().lower() not in PRESET_NAMES and "; decoders" not in str(x)}
    return {str(f(model)) for n, f in (("performance", performance), ("accuracy", accuracy)) if n in names} - listed


PRESET_NAMES = ("performance", "accuracy", "reference")


# --- merging into an existing report ----------------------------------------------------------------
def is_config_header(h: str) -> bool:
    return norm_header(h).startswith("precision_cfg")


def _is_preset_header(h: str) -> bool:
    return norm_header(h) in ("performance", "accuracy")


def _new_block(sec: ReportSection) -> Block:
    lines = [f"## {sec.header}\n", "\n"]
    if sec.intro:
        lines += [sec.intro + "\n", "\n"]
    lines += table_lines(sec.rows)
    lines += ["\n", f"Notes ({sec.model}): {sec.note}\n", "\n"]
    return Block(lines)


def _merge_block(block: Block, sec: ReportSection) -> Block:
    """Replace this model's rows and notes line in an existing section, keep the rest."""
    t = block.table()
    me = sec.model.lower()
    if t is None:  # a section without a table: add ours after the prose
        body = block.lines[1:]
        while body and not body[-1].strip():
            body.pop()
        lines = [block.lines[0]] + body + ["\n"] + table_lines(sec.rows) + ["\n", f"Notes ({sec.model}): {sec.note}\n", "\n"]
        return Block(lines)
    # rows mapped onto our columns by name (foreign tables with other columns keep what matches)
    idx = {c.strip().lower(): i for i, c in enumerate(t.columns)}
    mapped = [[r[idx[c.lower()]] if c.lower() in idx and idx[c.lower()] < len(r) else "" for c in COLUMNS] for r in t.rows]
    widths = [t.widths[idx[c.lower()]] if c.lower() in idx and idx[c.lower()] < len(t.widths) else 0 for c in COLUMNS]
    rows: list[list[str]] = []
    placed = False
    for r in mapped:
        if r[0].strip().lower() == me:
            if not placed:
                rows += sec.rows
                placed = True
            continue
        rows.append(r)
    if not placed:
        rows += sec.rows
    before, after = block.lines[: t.start], block.lines[t.end:]
    # the notes lines right after the table, one paragraph each; ours replaces our old one in place
    k, notes = 0, []
    while k < len(after) and (not after[k].strip() or NOTE_RE.match(after[k].strip())):
        if after[k].strip():
            notes.append(after[k] if after[k].endswith("\n") else after[k] + "\n")
        k += 1
    note = f"Notes ({sec.model}): {sec.note}\n"
    mine = [i for i, ln in enumerate(notes) if NOTE_RE.match(ln.strip()).group("model").strip().lower() == me]
    if mine:
        notes[mine[0]] = note
        notes = [ln for i, ln in enumerate(notes) if i not in mine[1:]]
    else:
        notes.append(note)
    tail = ["\n"]
    for ln in notes:
        tail += [ln, "\n"]
    return Block(before + table_lines(rows, min_widths=widths) + tail + after[k:])


def update_report(existing: str | None, new: Sequence[ReportSection]) -> str:
    """Write `new` into the report text `existing` (None or empty: a fresh report)."""
    blocks = parse_markdown(existing) if existing and existing.strip() else parse_markdown(PREAMBLE + "\n")
    if blocks and blocks[-1].lines and blocks[-1].lines[-1].strip():
        blocks[-1].lines[-1] = blocks[-1].lines[-1].rstrip("\n") + "\n"
    last_preset = max((i for i, b in enumerate(blocks) if b.is_section and _is_preset_header(b.header)), default=None)
    last_config = max((i for i, b in enumerate(blocks) if b.is_section and is_config_header(b.header)), default=None)
    for sec in new:
        preset = _is_preset_header(sec.header)
        want = norm_header(sec.header)
        found = next((i for i, b in enumerate(blocks) if b.is_section and norm_header(b.header) == want), None)
        if found is not None:
            blocks[found] = _merge_block(blocks[found], sec)
            pos = found
        else:
            if preset and last_preset is not None:
                pos = last_preset + 1
            elif preset:  # before the first section (and before a `# ` title over config sections)
                pos = next((i for i, b in enumerate(blocks) if b.is_section), len(blocks))
                if pos < len(blocks) and is_config_header(blocks[pos].header) and blocks[pos - 1].level == 1:
                    pos -= 1
            elif last_config is not None:
                pos = last_config + 1
            else:
                if not any(b.level == 1 and "precision" in b.header.lower() for b in blocks):
                    _ensure_blank_end(blocks, len(blocks) - 1)
                    blocks.append(Block([CONFIG_HEADING + "\n", "\n"]))
                pos = len(blocks)
            _ensure_blank_end(blocks, pos - 1)
            blocks.insert(pos, _new_block(sec))
            if last_preset is not None and pos <= last_preset:
                last_preset += 1
            if last_config is not None and pos <= last_config:
                last_config += 1
        if preset:
            last_preset = pos
        else:
            last_config = pos
    return render_markdown(blocks)


def _ensure_blank_end(blocks: list[Block], i: int) -> None:
    if 0 <= i < len(blocks) and blocks[i].lines and blocks[i].lines[-1].strip():
        blocks[i].lines.append("\n")
