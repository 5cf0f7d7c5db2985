"""Progress bars of long operations (engine.progress, tqdm): drawn on a terminal with the time
left, silent in logs, pipes and captured output (issue 19: 25-minute `sweep check`s in silence)."""
from __future__ import annotations

import io
import sys

from engine import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("TTSWEEP_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()  # a log file or a pipe
    b = progress.bar(range(3), desc="quiet", unit="step")
    assert list(b) == [0, 1, 2]
    b.close()
    assert sys.stderr.getvalue() == ""

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress.enabled()
    b = progress.bar(range(3), desc="loud", unit="step", mininterval=0)
    assert list(b) == [0, 1, 2]
    b.close()
    out = term.getvalue()
    assert "loud" in out and "3/3" in out and "step" in out and "<" in out  # [elapsed<time left, rate]
    monkeypatch.setenv("TTSWEEP_PROGRESS", "0")
    assert not progress.enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("TTSWEEP_PROGRESS", "1")
    assert progress.enabled()
    one = progress.bar(range(1), desc="single")  # one step: no estimate to give, no bar
    assert one.disable


def test_windowed_evaluation_shows_its_windows(monkeypatch, capsys, tiny_llama_dir):
    from engine.accuracy.evaluator import Evaluator

    monkeypatch.setenv("TTSWEEP_PROGRESS", "1")
    ev = Evaluator("tiny-llama", prefill=8, decode=8, windows=3)
    res = ev.evaluate("defaults")
    err = capsys.readouterr().err
    assert "fp32 reference of tiny-llama" in err and "evaluating" in err and "/3 [" in err and "window" in err
    assert res.windows == 3
    monkeypatch.delenv("TTSWEEP_PROGRESS")
    ev.evaluate("defaults")
    assert capsys.readouterr().err == ""  # captured stderr is no terminal


def test_sweep_check_counts_its_evaluations_and_keeps_its_verdict_lines(monkeypatch, capsys):
    from sweep import report

    text = ("## Performance\n\n| Model | Device | Top-1 (%) | Top-5 (%) |\n|---|---|---|---|\n"
            "| SmolLM2-135M | N150 | 90 | 98 |\n\n"
            "## Accuracy\n\n| Model | Device | Top-1 (%) | Top-5 (%) |\n|---|---|---|---|\n"
            "| SmolLM2-135M | N150 | 90 | 98 |\n")

    class Ev:
        def evaluate(self, cfg):
            return type("R", (), {"top1": 95.0, "top5": 99.0})()

    monkeypatch.setenv("TTSWEEP_PROGRESS", "1")
    verdicts = report.check_report(text, evaluator_factory=lambda *a: Ev())
    out, err = capsys.readouterr()
    assert [v.ok for v in verdicts] == [True, True]
    assert out.count("PASS") == 2 and "sweep check" in err and "/2 [" in err


def test_calibration_ticks_once_per_fit(monkeypatch):
    from engine.perf import calibrate as cal

    rows = [cal.Row(model="Llama3.2-1B", device="N150", config="performance", speed=84.5, ttft=26.0),
            cal.Row(model="Llama3.1-8B", device="N150", config="performance", speed=27.8, ttft=107.0),
            cal.Row(model="Llama3.1-8B", device="N300", config="performance", speed=43.3, ttft=68.0)]
    ticks = []
    cal.fit(rows, starts=2, max_nfev=5, tick=lambda: ticks.append(1))
    assert len(ticks) == 2
    ticks.clear()
    cv = cal.cross_validate(rows, "device", tick=lambda: ticks.append(1))
    assert len(ticks) == len(cv) == 2
