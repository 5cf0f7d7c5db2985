"""`sweep check`: re-evaluate each section's config of a report and compare with its table."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.vocab.config import Config, accuracy, performance
from sweep.report.markdown import ACC_RE, DEFAULT_EVAL, Block, norm_header, registry_name, sections
from sweep.report.study_sections import is_config_header

# --- regression check (sweep check) -----------------------------------------------------------------
TOLERANCE = 0.5  # tt-metal's rule: measured >= table - 0.5


@dataclass
class Verdict:
    section: str
    model: str  # as written in the table
    device: str
    table_top1: float | None
    table_top5: float | None
    top1: float | None = None
    top5: float | None = None
    ok: bool | None = None  # None: not checked (see reason)
    reason: str = ""
    top1_windows: list[float] = field(default_factory=list)  # per-window Top-1 when more than one window

    def line(self) -> str:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        parts = [f"{word}  {self.model:<14} {self.device:<6} {short_header(self.section)}"]
        if self.ok is not None:
            cmp = []
            for name, got, want in (("Top-1", self.top1, self.table_top1), ("Top-5", self.top5, self.table_top5)):
                if want is not None:
                    sign = ">=" if got >= want - TOLERANCE else "<"
                    cmp.append(f"{name} {got:.2f} {sign} {want:g} - {TOLERANCE:g}")
            parts.append(", ".join(cmp))
            if len(self.top1_windows) > 1:
                w = self.top1_windows
                parts.append(f"({len(w)} windows; per-window Top-1 {min(w):.1f}-{max(w):.1f})")
        if self.reason:
            parts.append(self.reason)
        return "  ".join(parts)


def short_header(header: str) -> str:
    if is_config_header(header):
        head, sep, tail = header.partition("; decoders = {")
        try:
            s = Config.parse(head).diff()
        except Exception:  # noqa: BLE001 - print the header as written
            return header
        return f"[{s}{'; per-layer' if sep else ''}]"
    return f"[{header}]"


def section_config(header: str, model: str):
    """The config a section stands for: a preset for Performance/Accuracy, the header's config
    string for config sections, None for sections that are not configs (long context, batch 32)."""
    h = norm_header(header)
    if h == "performance":
        return performance(model)
    if h == "accuracy":
        return accuracy(model)
    if is_config_header(header):
        head, sep, _ = header.strip().partition("; decoders = {")
        return header.strip() if sep else Config.parse(head)
    return None


def accuracy_settings(block: Block, model_display: str) -> dict:
    """prefill/decode from the section's notes line for this model (default 512 + 511)."""
    for m, text in block.notes().items():
        if m.lower() == model_display.lower():
            found = ACC_RE.search(text)
            if found:
                return {"prefill": int(found.group(1)), "decode": int(found.group(2)), "windows": int(found.group(3) or 1)}
    return dict(DEFAULT_EVAL)


def _num(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def default_evaluator(model: str, prefill: int, decode: int, windows: int = 1):
    from engine.accuracy.evaluator import Evaluator

    return Evaluator(model, prefill=prefill, decode=decode, windows=windows)


def _rows_to_check(text: str, want: str | None, windows: int | None) -> list[tuple[Verdict, str, tuple, object]]:
    """(verdict, model, evaluator key, config) of each table row with a Top-1 / Top-5 to check."""
    rows: list[tuple[Verdict, str, tuple, object]] = []
    for block in sections(text):
        t = block.table()
        if t is None:
            continue
        try:
            cm, cd, c1, c5 = (t.column(c) for c in ("Model", "Device", "Top-1 (%)", "Top-5 (%)"))
        except KeyError:
            continue
        for row in t.rows:
            cells = row + [""] * (len(t.columns) - len(row))
            disp, dev = cells[cm], cells[cd]
            if "(DP=" in disp or "(DP=" in dev:
                continue
            t1, t5 = _num(cells[c1]), _num(cells[c5])
            if t1 is None and t5 is None:
                continue
            reg = registry_name(disp)
            if want is not None and reg != want:
                continue
            cfg = section_config(block.header, reg)
            if cfg is None:
                continue
            st = accuracy_settings(block, disp)
            if windows is not None:
                st["windows"] = windows
            rows.append((Verdict(block.header, disp, dev, t1, t5), reg, (reg, st["prefill"], st["decode"], st["windows"]), cfg))
    return rows


def check_report(text: str, model: str | None = None, evaluator_factory=None, emit=print,
                 windows: int | None = None) -> list[Verdict]:
    """Re-evaluate each section's config for the rows of models that can be run and compare with
    the table (tt-metal's rule: measured Top-1 / Top-5 >= table - 0.5). Prints one verdict per row.

    Each row is measured as its notes line says (prefill, decode, windows; 1 window when it says
    none); `windows` overrides the window count (`sweep check --windows N`). A progress bar counts
    the distinct evaluations with the time left (engine.progress: on a terminal only)."""
    from engine.progress import bar, enabled
    from engine.progress import write as bar_write

    factory = evaluator_factory or default_evaluator
    rows = _rows_to_check(text, None if model is None else registry_name(model), windows)
    evaluators: dict[tuple, object] = {}
    broken: dict[str, str] = {}
    results: dict[tuple, tuple[float, float]] = {}
    verdicts: list[Verdict] = []
    steps = bar(total=len({key + (str(cfg),) for _, _, key, cfg in rows}), desc="sweep check", unit="config")
    say = (lambda line: bar_write(line)) if emit is print and enabled() else emit
    for v, reg, key, cfg in rows:
        verdicts.append(v)
        if reg in broken:
            v.reason = broken[reg]
            say(v.line())
            continue
        try:
            if key not in evaluators:
                extra = (key[3],) if key[3] != 1 else ()  # factories of (model, prefill, decode) still work
                evaluators[key] = factory(reg, key[1], key[2], *extra)
        except Exception as exc:  # noqa: BLE001 - a model this machine cannot run: skip its rows
            broken[reg] = f"cannot run model {reg!r}: {exc}"
            v.reason = broken[reg]
            say(v.line())
            continue
        rkey = key + (str(cfg),)
        if rkey not in results:
            res = evaluators[key].evaluate(cfg)
            results[rkey] = (float(res.top1), float(res.top5), list(getattr(res, "top1_windows", None) or []))
            steps.update(1)
        v.top1, v.top5, v.top1_windows = results[rkey]
        t1, t5 = v.table_top1, v.table_top5
        v.ok = all(got >= exp - TOLERANCE for got, exp in ((v.top1, t1), (v.top5, t5)) if exp is not None)
        say(v.line())
    steps.close()
    return verdicts
