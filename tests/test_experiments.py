"""The digits experiment: data, method factories, and an end-to-end run of the runner."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import reparam as rp

from experiments import methods as M
from experiments.configs import digits as digits_config
from experiments.data import digits
from experiments.models import MLP
from experiments.run import make_fns, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    source, target = digits.tasks(digits.load())
    model = MLP()
    params = model.init(jax.random.key(0), source["train"][0][:1])["params"]
    return model, params, target


def test_data_split_and_tasks():
    data = digits.load(seed=0)
    assert data["train"][0].shape == (1347, 64) and data["test"][0].shape == (450, 64)
    assert 0.0 <= data["train"][0].min() and data["train"][0].max() == 1.0
    source, target = digits.tasks(data)
    for task in (source, target):
        for x, y in task.values():
            assert set(np.unique(y)) == {0, 1, 2, 3, 4} and len(x) == len(y)
    assert len(source["train"][0]) + len(target["train"][0]) == 1347
    a = digits.batches(*target["train"], 32, seed=3)
    b = digits.batches(*target["train"], 32, seed=3)
    for _ in range(30):   # crosses an epoch boundary
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.shape == (32, 64) and np.array_equal(ya, yb) and np.array_equal(xa, xb)


def test_method_names():
    assert M.names("lora, pissa") == ["lora", "pissa"]
    assert M.names(["eva"]) == ["eva"]
    with pytest.raises(rp.ReparamError, match="unknown methods"):
        M.names("lora,nope")
    with pytest.raises(rp.ReparamError, match=r"methods \['lora'\] listed twice in 'lora, pissa,lora' \(a method's "
                                              r"phase runs once\); drop the repeats"):
        M.names("lora, pissa,lora")


@pytest.mark.parametrize("name", list(M.METHODS))
def test_method_builds_a_plan(setup, name):
    _, params, _ = setup
    plan = rp.plan(M.METHODS[name](digits_config.get_config()), params)
    adapted = set(plan.adapted())
    if name == "full":
        assert len(adapted) == 6
    elif name == "head":
        assert adapted == {"head/kernel", "head/bias"}
    else:
        assert adapted == {"hidden_0/kernel", "hidden_1/kernel", "head/kernel", "head/bias"}
        kinds = plan.calibrated()
        expected = {"corda": "cov", "eva": "cov", "lora_sb": "grad", "spt": "grad"}.get(name)
        assert kinds == ({} if expected is None else {"hidden_0/kernel": expected, "hidden_1/kernel": expected})


@pytest.mark.parametrize("name", ["lora", "lora_sb", "pissa_rsvd", "corda", "eva"])
def test_fresh_adapter_keeps_the_output(setup, name):
    model, params, target = setup
    config = digits_config.get_config()
    loss_fn, _ = make_fns(model)
    plan = rp.plan(M.METHODS[name](config), params)
    it = digits.batches(*target["train"], 64, seed=1)
    calib = M.calibrate(name, plan, config, model=model, params=params, batches=[next(it) for _ in range(2)],
                        loss_fn=lambda p, b: loss_fn(p, b)[0])
    frozen, trainable = plan.init(jax.random.key(0), params, calib)
    x = target["test"][0]
    np.testing.assert_allclose(model.apply({"params": plan.merge(frozen, trainable)}, x),
                               model.apply({"params": params}, x), atol=2e-4)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_runner_end_to_end(tmp_path):
    out = tmp_path / "cli"
    steps, adapt_steps, methods = 150, 60, ["full", "lora", "eva"]
    flags = [f"--config.pretrain_steps={steps}", f"--config.adapt_steps={adapt_steps}",
             f"--config.methods={','.join(methods)}", "--config.progress=False", "--config.eval_every=20",
             "--config.hidden=(256, 256)", "--config.batch_size=64"]
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--config=experiments/configs/digits.py",
                           *flags, f"--config.output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("metrics.jsonl", "results.json", "results.png"):
        assert (out / f).stat().st_size > 0, f

    table = proc.stdout[proc.stdout.index("method  "):]
    for name in methods:
        assert any(line.startswith(name + " ") for line in table.splitlines()), (name, table)
    assert "plan.summary()" in proc.stdout and "lora(r=8, alpha=16)" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == methods
    assert results["pretrain"]["acc"] > 0.9
    assert results["untrained_head_acc"] < 0.5
    assert results["methods"]["lora"]["acc"] > max(0.8, results["untrained_head_acc"])   # chance is 20%
    assert results["methods"]["full"]["pct_trainable"] == 100.0
    assert all(r["step_ms"] > 0 for r in results["methods"].values())

    records = _read_jsonl(out / "metrics.jsonl")
    assert len(records) == steps + len(methods) * adapt_steps
    assert {r["method"] for r in records} == {"pretrain", *methods}
    assert sum("test_acc" in r for r in records if r["method"] == "lora") == adapt_steps // 20

    # the same config in-process gives the same numbers (fixed seeds)
    config = digits_config.get_config()
    config.update_from_flattened_dict({"pretrain_steps": steps, "adapt_steps": adapt_steps,
                                       "methods": ",".join(methods), "progress": False, "eval_every": 20,
                                       "hidden": (256, 256), "batch_size": 64,
                                       "output_dir": str(tmp_path / "inproc")})
    again = run(config)
    assert {n: r["acc"] for n, r in again["methods"].items()} == \
        {n: r["acc"] for n, r in results["methods"].items()}
    assert _read_jsonl(tmp_path / "inproc" / "metrics.jsonl") == records
