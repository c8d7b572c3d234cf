"""Executes every notebook in colab/ top to bottom (nbclient, a python3 kernel on this interpreter).

Each notebook runs in a fresh temporary working directory, so what it writes (PEFT adapters, checkpoints)
never lands in the repository; the repository root is put on the kernel's PYTHONPATH so ``import reparam``
finds this checkout. A cell that raises fails the test with the cell's source and traceback. For the
quickstart, the key outputs are checked too: the plan summary's matmul column, the decreasing loss and its
plot, merge == apply, the exported PEFT files and the restored checkpoint.
"""
from __future__ import annotations

import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
CELL_TIMEOUT_S = 300


def _execute(path: str, cwd: str):
    """The executed notebook: every code cell run in order in a new kernel started in ``cwd``."""
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": cwd}})
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        pytest.fail(f"{os.path.relpath(path, ROOT)} failed:\n{e}", pytrace=False)
    return nb


def _text(nb) -> str:
    """All stream and text/plain outputs of the executed notebook, in order."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                out.append(o.data.get("text/plain", ""))
    return "\n".join(out)


def test_colab_has_notebooks():
    assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    nb = _execute(path, str(tmp_path))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    if os.path.basename(path) != "quickstart.ipynb":
        return
    text = _text(nb)
    # plan.summary(): the adapted kernels route through the custom VJP, the head through autodiff, and
    # after a step the forward chosen at 64 images x 8 rows = 512 tokens per call
    assert "custom-vjp" in text and "autodiff" in text, text
    assert "materialised @ 512 tok (custom-vjp" in text, text
    for name in ("lora(r=4, alpha=8)", "vera(r=16", "add(lora(r=2), sparse.random(", "lokr(r=2"):
        assert name in text, name
    first, last = map(float, re.search(r"\nloss ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < 0.5 * first, (first, last)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", [])), "no loss plot"
    assert float(re.search(r"max \|merged - adapted\| logits: (\S+)", text).group(1)) < 1e-5
    assert "round trip, max difference: 0.0" in text
    assert "trainables identical: True" in text and "another config is refused" in text
    adapter = tmp_path / "quickstart_out" / "lora_adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not os.path.exists(os.path.join(ROOT, "quickstart_out"))
