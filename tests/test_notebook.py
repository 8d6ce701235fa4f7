"""The quickstart notebook executes top to bottom on the real default models, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 900  # the first run trains the demo classifier (minutes on 2 CPU cores)


@pytest.mark.integration
def test_quickstart_notebook_runs_without_errors(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=dict(os.environ))  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert all(c.get("execution_count") for c in code), "every code cell ran"
    flagged_cell = next(c for c in code if "Who is Harry Potter?" in c.source)
    shown = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in flagged_cell.outputs)
    assert "route='corrupted'" in shown, shown
