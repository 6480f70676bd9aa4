"""The Colab notebook, executed on the CPU with a tiny config (ORPHEUS_NOTEBOOK_TEST=1), as committed."""

import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "orpheus_jax.ipynb")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture
def kernel_of_this_python(tmp_path, monkeypatch):
    """A kernelspec running this interpreter, whatever 'python3' means elsewhere on the machine."""
    spec = tmp_path / "jupyter" / "kernels" / "orpheus-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "orpheus-test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "orpheus-test"


@pytest.mark.slow
def test_notebook_runs_every_cell_and_samples(kernel_of_this_python, iliad_path, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = dict(
        os.environ,
        ORPHEUS_NOTEBOOK_TEST="1",
        ORPHEUS_NOTEBOOK_RUNS=str(tmp_path / "runs"),
        ORPHEUS_DATA=iliad_path,
        ORPHEUS_CACHE=str(tmp_path / "cache"),
        TPU_ACCELERATOR_TYPE="v5litepod-1",
    )  # looks like a TPU runtime whose JAX sees only the CPU
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name=kernel_of_this_python,
        resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
    )
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    devices = next(c for c in code if "jax.default_backend()" in c.source)
    assert "JAX sees ONLY THE CPU" in text(devices)
    train = next(c for c in code if "train(cfg, WORKDIR, DATA)" in c.source)
    assert "step 20: train loss" in text(train) and "Done: step 20" in text(train)
    # The live progress bar is a widget, as on Colab (tqdm.auto); its last state is kept with the notebook.
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in train.outputs)
    bar = json.dumps(nb.metadata.get("widgets", {}))
    assert "20/20" in bar and "loss=" in bar and "tok_s=" in bar
    plot = next(c for c in code if "losses.png" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    sample = next(c for c in code if "sample" in c.metadata.get("tags", []))
    out = text(sample)
    assert out.startswith("Achilles") and len(out) == len("Achilles") + 500 + 1, out
    assert os.path.exists(tmp_path / "runs" / "notebook_test" / "checkpoints" / "20")
