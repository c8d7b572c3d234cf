"""Executes every notebook in colab/ top to bottom (nbclient, a python3 kernel on this interpreter).

Each notebook runs in a fresh temporary working directory, so what it writes (PEFT adapters, checkpoints)
never lands in the repository; the repository root is put on the kernel's PYTHONPATH so ``import reparam``
finds this checkout. A cell that raises fails the test with the cell's source and traceback. The key
outputs are checked too. Quickstart: the plan summary's matmul column, the decreasing loss and its plot,
merge == apply, the exported PEFT files and the restored checkpoint. finetune_minilm (its kernel sees 2 CPU
devices, ``--xla_force_host_platform_device_count=2``, so its data-parallel mesh really splits the batches):
the mesh line, the gain in validation accuracy, the loss plot, the exported adapter and its parity in PyTorch.
finetune_smollm2: generation before, every stacked projection routed, the answer loss falling and validation
accuracy rising, merge == apply, and the exported adapter's logits in transformers.
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
XLA_FLAGS = {"finetune_minilm.ipynb": "--xla_force_host_platform_device_count=2"}   # per notebook, added


def _execute(path: str, cwd: str):
    """The executed notebook: every code cell run in order in a new kernel started in ``cwd``."""
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    flags = XLA_FLAGS.get(os.path.basename(path))
    if flags:
        env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags]))
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


def _has_plot(nb) -> bool:
    return any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_colab_has_notebooks():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "finetune_minilm.ipynb", "finetune_smollm2.ipynb"} <= names, NOTEBOOKS
    assert set(XLA_FLAGS) <= names, XLA_FLAGS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    nb = _execute(path, str(tmp_path))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    check = {"quickstart.ipynb": _check_quickstart, "finetune_minilm.ipynb": _check_finetune_minilm,
             "finetune_smollm2.ipynb": _check_finetune_smollm2}
    check[os.path.basename(path)](nb, _text(nb), tmp_path)


def _check_quickstart(nb, text, tmp_path):
    # plan.summary(): the adapted kernels may be routed, the head has no structure; with the step's routing,
    # every use routed, with the forward chosen at 64 images x 8 rows = 512 tokens per call
    assert "structured (untraced)" in text and "autodiff (no ΔW structure)" in text, text
    assert "1/1 routed (materialised @ 512 tok)" in text and "custom-vjp" not in text, text
    for name in ("lora(r=4, alpha=8)", "vera(r=16", "add(lora(r=2), sparse.random(", "lokr(r=2"):
        assert name in text, name
    first, last = map(float, re.search(r"\nloss ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < 0.5 * first, (first, last)
    assert _has_plot(nb), "no loss plot"
    assert float(re.search(r"max \|merged - adapted\| logits: (\S+)", text).group(1)) < 1e-5
    assert "round trip, max difference: 0.0" in text
    assert "trainables identical: True" in text and "another config is refused" in text
    adapter = tmp_path / "quickstart_out" / "lora_adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", "reparam_plan.json"]
    assert not os.path.exists(os.path.join(ROOT, "quickstart_out"))


def _check_finetune_minilm(nb, text, tmp_path):
    # the CPU settings, and a data-parallel mesh over the 2 devices the kernel was given
    assert "settings: steps=30, batch=16, seq_len=48" in text, text
    assert "devices: 2 x cpu, mesh data:2" in text, text
    assert "batch sharding: P('data',)" in text, text
    assert "lora(r=8, alpha=16): 12 leaves, 73,728 trainable" in text, text
    assert "1/1 routed (materialised @ 768 tok)" in text, text       # traced at 16 tweets x 48 tokens
    # 30 LoRA steps on 300 fixed validation tweets: an untrained head near chance, then well above it
    before, after = map(float, re.search(r"validation accuracy: ([\d.]+) -> ([\d.]+)", text).groups())
    assert before < 0.45 and after > before + 0.2 and after > 0.55, (before, after)
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < first - 0.1, (first, last)
    assert float(re.search(r"test accuracy: ([\d.]+) on 300 tweets", text).group(1)) > 0.55, text
    assert _has_plot(nb), "no loss plot"
    # the LoRA adapter in PEFT's format, with torch module names, and the head beside it, in the cwd
    out = tmp_path / "finetune_out"
    assert sorted(os.listdir(out / "lora_adapter")) == ["adapter_config.json", "adapter_model.safetensors", "reparam_plan.json"]
    assert os.path.getsize(out / "head.safetensors") > 384 * 3 * 4
    assert "target_modules: 12 e.g. encoder.layer.0.attention.self.query" in text, text
    assert "round trip, max difference: 0.0" in text, text
    assert float(re.search(r"max \|torch PEFT - flax\| logits: (\S+)", text).group(1)) < 1e-4, text
    assert not os.path.exists(os.path.join(ROOT, "finetune_out"))


def _check_finetune_smollm2(nb, text, tmp_path):
    # the CPU settings; generation before; all 7 stacked projections routed inside the scan, its body recomputed
    assert "settings: steps=16, batch=8, seq_len=96" in text, text
    assert "before: 'The capital of France is Paris.'" in text, text
    assert text.count("1/1 routed (materialised @ 768 tok x30 layers, scan body rematerialised: "
                      "DotsSaveable(only_if_no_batch_dims=True))") == 7, text
    assert "7 leaves, 2,442,240 trainable" in text, text
    # 16 LoRA steps: the answer loss falls and validation accuracy on 64 tweets rises over zero-shot
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", text).groups())
    assert last < first - 0.2, (first, last)
    before, after = map(float, re.search(r"validation accuracy: ([\d.]+) -> ([\d.]+)", text).groups())
    assert after > before, (before, after)
    assert _has_plot(nb), "no loss plot"
    assert float(re.search(r"max \|merged - applied\| logits: (\S+)", text).group(1)) < 1e-5, text
    # the exported adapter: one torch module per layer and projection, and the same logits in transformers
    assert "target_modules: 210 e.g. model.layers.0.mlp.down_proj" in text, text
    assert "round trip, max difference: 0.0" in text, text
    assert float(re.search(r"max \|torch PEFT - flax\| logits: (\S+)", text).group(1)) < 1e-3, text
    assert "same argmax everywhere: True" in text, text
    out = tmp_path / "smollm2_out" / "lora_adapter"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "reparam_plan.json"]
