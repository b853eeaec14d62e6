"""The example notebooks run top to bottom, headless, in their small setting (as CI runs them).

Notebooks whose outputs are the point (the own-model walk-through) also have their printed results checked.
"""

import glob
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(HERE), "examples", "notebooks", "*.ipynb")))


def _stream_text(notebook):
    """Everything the notebook printed (stdout streams and text/plain results), in order."""
    pieces = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                pieces.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                pieces.append(output["data"]["text/plain"])
    return "".join(pieces)


def _number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"the notebook printed no line matching {pattern!r}; it printed:\n{text[-3000:]}"
    return float(match.group(1))


def _check_own_model(text, workdir):
    """05_your_own_model: a model trained, saved, reloaded in a new process, evaluated, and the report read."""
    # Which penalties apply: every penalty trains on the Dense chain; the weight-perturbation bound refuses the
    # residual CNN with a StructureError instead of silently computing something else.
    assert re.search(r"sequential_mlp\s+weight_perturbation\s+trains", text)
    assert re.search(r"functional_cnn\s+weight_perturbation\s+StructureError", text)
    assert re.search(r"functional_cnn\s+input_gradient\s+trains", text)
    assert "kernels of stem_conv feed a normalization layer" in text  # WEISSI's BatchNorm warning is shown
    # Trained: far above chance (0.1) on held-out MNIST.
    trained = _number(r"test accuracy (\d\.\d+) \(TRAINED\)", text)
    assert trained > 0.6
    # Saved, then reloaded in another process: the same logits, and the penalty came back with the file.
    assert os.path.getsize(os.path.join(workdir, "my_model.keras")) > 10_000
    assert _number(r"RELOADED max \|logit difference\| = ([0-9.e+-]+)", text) < 1e-5
    assert "penalties saved with it: ['input_gradient']" in text
    # Evaluated by keras_wssi.evaluation in that process; the report read back agrees with the training process
    # on the same test images (to within one example of 500) and PGD does not raise accuracy.
    with open(os.path.join(workdir, "my_report", "report.json"), encoding="utf-8") as handle:
        entry = json.load(handle)["models"]["functional_cnn"]
    clean = _number(r"REPORT clean accuracy (\d\.\d+)", text)
    assert abs(clean - entry["metrics"]["clean"]["accuracy"]) < 1e-4
    assert abs(clean - trained) <= 1.0 / 500 + 1e-9
    assert _number(r"PGD ε=0\.1 accuracy (\d\.\d+)", text) <= clean
    assert {"attack/fgsm", "attack/pgd", "noise/gaussian"} <= set(entry["curves"])


OUTPUT_CHECKS = {"05_your_own_model.ipynb": _check_own_model}


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1
    assert set(OUTPUT_CHECKS) <= {os.path.basename(p) for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_WSSI_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("KERAS_WSSI_DATA_DIR", data_dir)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks without outputs"
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    check = OUTPUT_CHECKS.get(os.path.basename(path))
    if check is not None:
        check(_stream_text(notebook), str(tmp_path))
