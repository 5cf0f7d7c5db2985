"""notebooks/pareto.ipynb runs top to bottom against a small synthetic study (nbclient)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from synthetic_study import build_study, journal_storage  # noqa: E402  (test fixture)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pareto.ipynb"


def test_notebook_runs(tmp_path, monkeypatch):
    log = tmp_path / "lt-pareto.log"
    build_study(storage=journal_storage(log))
    monkeypatch.setenv("SWEEP_STUDY_STORAGE", str(log))
    monkeypatch.setenv("SWEEP_PLOTS_OUT", str(tmp_path / "plots"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.monotonic()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    elapsed = time.monotonic() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "study lt-pareto" in text and "front: trials" in text
    assert "no importances" not in text  # every objective got its importances
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5 + 1  # the five front plots and the importance chart
    assert (tmp_path / "plots" / "lt-pareto" / "index.md").exists()
    assert elapsed < 60, f"notebook took {elapsed:.0f} s"
