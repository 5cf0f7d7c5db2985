"""optuna-dashboard on a study made by `sweep`: its API names the objectives top1 / speed:N150 /
ttft:N150 (sweep.metric_names, set where the study is created)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("optuna_dashboard")

STUDY = """
[study]
name = "dash"
model = "tiny-llama"
devices = ["N150"]
objectives = ["top1", "top5", "speed:N150", "ttft:N150"]
storage = "journal:{log}"
[space]
ff1_3 = ["bfp8", "bf16"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def test_dashboard_shows_the_metric_names(tmp_path):
    from sweep.space import load_spec
    from sweep.study import load_study

    log = tmp_path / "dash.log"
    toml = tmp_path / "dash.toml"
    toml.write_text(STUDY.format(log=log))
    spec = load_spec(toml)
    study = load_study(spec, create=True)
    assert study.metric_names == ["top1", "top5", "speed:N150", "ttft:N150"]
    load_study(spec, create=True)  # reopening keeps them (and writes nothing new)

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "optuna_dashboard._cli", str(log), "--host", "127.0.0.1",
                             "--port", str(port), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                    pytest.fail(f"optuna-dashboard did not answer on port {port}: {out[-2000:]}")
                time.sleep(0.3)
        [summary] = [s for s in studies if s["study_name"] == "dash"]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == ["top1", "top5", "speed:N150", "ttft:N150"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
