"""The runner's checkpoints, resume after SIGKILL, peak memory, bf16 base and remat (experiments/run.py)."""
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import reparam as rp
import safetensors.numpy

from experiments import report
from experiments.configs import digits as digits_config
from experiments.data import digits
from experiments.run import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40          # pretraining and adaptation steps
EVERY = 5           # checkpoint_every
TINY = {"methods": "lora", "hidden": (64, 64), "pretrain_steps": STEPS, "adapt_steps": STEPS, "batch_size": 32,
        "checkpoint_every": EVERY, "keep_checkpoints": 3, "eval_every": 10, "calib_batches": 1, "progress": False}


def _config(output_dir, **overrides):
    config = digits_config.get_config()
    config.update_from_flattened_dict({**TINY, "output_dir": str(output_dir), **overrides})
    return config


def _flags(output_dir, **overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY, "output_dir": output_dir, **overrides}.items()]


def _cli(output_dir, log, **overrides):
    return subprocess.Popen([sys.executable, "-m", "experiments.run", "--config=experiments/configs/digits.py",
                             *_flags(output_dir, **overrides)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=rp.train.huge_pages_env())     # set already: the runner need not re-execute itself


def _steps(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _kill_when_saved(proc, directory, step, timeout=300.0):
    """SIGKILLs ``proc`` as soon as a checkpoint of a step in [step, STEPS) is complete in ``directory``."""
    deadline = time.monotonic() + timeout
    while not any(step <= s < STEPS for s in _steps(directory)):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before a checkpoint of step >= {step}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _records(output_dir):
    return report.read_jsonl(os.path.join(output_dir, "metrics.jsonl"))


def test_batches_from_a_start_step_are_those_the_run_would_have_seen():
    x, y = digits.tasks(digits.load())[1]["train"]
    for batch_size in (32, 100):                        # 21 and 6 batches per epoch
        ref = list(itertools.islice(digits.batches(x, y, batch_size, seed=3), 50))
        for start in (1, 6, 7, 21, 22, 45):
            got = itertools.islice(digits.batches(x, y, batch_size, seed=3, start=start), 50 - start)
            for (xa, ya), (xb, yb) in itertools.zip_longest(ref[start:], got):
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb), (batch_size, start)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(rp.ReparamError, match=r"config.resume=True needs config.checkpoint_every > 0"):
        run(_config(tmp_path, resume=True, checkpoint_every=0))
    with pytest.raises(rp.ReparamError, match=r"config.base_dtype='int8' is not a floating dtype"):
        run(_config(tmp_path, base_dtype="int8"))


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identical(tmp_path):
    """Killed in pretraining, resumed; killed in adaptation, resumed: the same arrays and records as one run."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    rng = random.Random()
    k_pre, k_lora = rng.randrange(EVERY, STEPS // 2 + 1, EVERY), rng.randrange(EVERY, STEPS // 2 + 1, EVERY)
    logs = [tmp_path / f"log{i}" for i in range(4)]
    procs = []

    def start(i, **overrides):
        with open(logs[i], "w") as log:
            procs.append(_cli(ref if i == 0 else out, log, **overrides))
        return procs[-1]

    try:
        uninterrupted = start(0, checkpoint_every=0)                   # checkpoints change nothing either
        _kill_when_saved(start(1), os.path.join(out, "checkpoints", "pretrain"), k_pre)
        _kill_when_saved(start(2, resume=True), os.path.join(out, "checkpoints", "lora"), k_lora)
        assert start(3, resume=True).wait(timeout=300) == 0, logs[3].read_text()[-3000:]
        assert uninterrupted.wait(timeout=300) == 0, logs[0].read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = [log.read_text() for log in logs]

    ctx = f"killed at pretrain checkpoint >= {k_pre}, lora checkpoint >= {k_lora}:\n" + "\n----\n".join(text[1:])
    at = [re.search(rf"\[{phase}\] resumed from its checkpoint at step (\d+) of {STEPS}\n", t)
          for phase, t in (("pretrain", text[2]), ("lora", text[3]))]
    assert at[0] and k_pre <= int(at[0][1]) < STEPS, ctx                  # mid-phase restores, not restarts
    assert at[1] and k_lora <= int(at[1][1]) < STEPS, ctx
    assert f"[pretrain] finished before: params from its checkpoint at step {STEPS}" in text[3], ctx

    a = safetensors.numpy.load_file(os.path.join(ref, "lora", "trainable.safetensors"))
    b = safetensors.numpy.load_file(os.path.join(out, "lora", "trainable.safetensors"))
    assert sorted(a) == sorted(b) == ["head/bias/w", "head/kernel/w", "hidden_0/kernel/A", "hidden_0/kernel/B",
                                      "hidden_1/kernel/A", "hidden_1/kernel/B"]
    for key in a:
        assert a[key].dtype == np.float32 and np.array_equal(a[key], b[key]), (key, ctx)

    records = _records(out)
    keys = [(r["method"], r["step"]) for r in records]
    assert keys == [(m, s) for m in ("pretrain", "lora") for s in range(1, STEPS + 1)], ctx   # each step once
    assert records == _records(ref), ctx                                   # the same values, evals included
    assert _steps(os.path.join(out, "checkpoints", "lora")) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
    results = json.loads(open(os.path.join(out, "results.json")).read())
    assert results["methods"]["lora"]["acc"] == json.loads(open(os.path.join(ref, "results.json")).read())[
        "methods"]["lora"]["acc"]


@pytest.mark.slow
def test_resume_skips_finished_phases_and_refuses_another_config(tmp_path):
    first = run(_config(tmp_path))
    records = _records(tmp_path)
    again = run(_config(tmp_path, resume=True, progress=True))             # a volatile key may change
    assert _records(tmp_path) == records                                    # nothing was redone
    assert again["methods"] == first["methods"] and again["pretrain"] == first["pretrain"]
    with pytest.raises(rp.ReparamError, match=r"checkpoints/pretrain \(step 40\) was written under another config: "
                                              r"rank: saved 8, now 4\. Resume with the run's own config"):
        run(_config(tmp_path, resume=True, rank=4))
    assert _records(tmp_path) == records


@pytest.mark.slow
def test_bf16_base_remat_and_peak_memory(tmp_path):
    runs = {name: run(_config(tmp_path / name, checkpoint_every=0, **kw))
            for name, kw in (("f32", {}), ("remat", {"remat": True}), ("bf16", {"base_dtype": "bfloat16"}))}
    loss = {name: [r["loss"] for r in _records(tmp_path / name) if r["method"] == "lora"] for name in runs}

    # remat recomputes the same forward pass: the same losses
    np.testing.assert_allclose(loss["remat"], loss["f32"], rtol=1e-6, atol=1e-6)
    assert runs["remat"]["precision"] == {"base": "float32", "trainable": "float32", "remat": True}

    # a bf16 base trains f32 adapters (and is a different model: the losses are not those of the f32 base)
    bf16 = runs["bf16"]
    assert bf16["precision"] == {"base": "bfloat16", "trainable": "float32", "remat": False}
    assert not np.allclose(loss["bf16"], loss["f32"], rtol=1e-5, atol=0)
    assert np.mean(loss["bf16"][-5:]) < 0.7 * np.mean(loss["bf16"][:5]) and bf16["methods"]["lora"]["acc"] > 0.6
    trained = safetensors.numpy.load_file(str(tmp_path / "bf16" / "lora" / "trainable.safetensors"))
    assert {str(v.dtype) for v in trained.values()} == {"float32"}
    footer = "precision: base weights bfloat16, trainables and optimizer state float32; remat off"
    assert footer in report.table(bf16)

    # peak memory: XLA's estimate for every phase, in results.json and the table
    for name in runs:
        saved = json.loads((tmp_path / name / "results.json").read_text())
        assert saved["pretrain"]["peak_bytes"] > 0 and saved["methods"]["lora"]["peak_bytes"] > 0
    table = report.table(runs["f32"]).splitlines()
    assert table[0].split()[-2:] == ["peak", "MB"]
    peak = runs["f32"]["methods"]["lora"]["peak_bytes"]
    assert float(table[2].split()[-1]) == pytest.approx(peak / 1e6, abs=0.05)
