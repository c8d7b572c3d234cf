"""The LT-SFT composition experiment (experiments/compose.py): helpers, and an end-to-end run of its CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reparam as rp

from experiments import compose as C
from experiments.configs import compose as compose_config
from experiments.models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["pretrained", "full FT A", "full FT B", "full FT A+B (sum)", "LT-SFT A", "LT-SFT B",
            "LT-SFT A+B (sum)"]


def test_pick_keeps_labels_and_mixed_batches():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.arange(20, dtype=np.int32) % 10
    xs, ys = C.pick((x, y), (8, 9))
    assert set(ys.tolist()) == {8, 9} and len(xs) == 4
    it = C.mixed_batches(C.pick((x, y), (5, 6, 7)), C.pick((x, y), (0, 1, 2, 3, 4)), 6, 0.5, seed=0)
    for _ in range(5):
        xb, yb = next(it)
        assert xb.shape == (6, 1) and sorted(yb[:3] // 5) == [1, 1, 1] and max(yb[3:]) <= 4
    assert C.label((0, 1, 2, 3, 4)) == "0-4" and C.label((8, 9)) == "8,9"


def test_restricted_softmax_ignores_other_classes():
    model = MLP(hidden=(8,), n_classes=10)
    x = jnp.ones((3, 4))
    params = model.init(jax.random.key(0), x)
    logits = C.Restricted(model, (0, 5, 6)).apply(params, x)
    np.testing.assert_allclose(logits[:, [0, 5, 6]], model.apply(params, x)[:, [0, 5, 6]], rtol=1e-6, atol=1e-6)
    assert jnp.all(logits[:, [1, 2, 3, 4, 7, 8, 9]] <= -1e8)


@pytest.mark.slow
def test_compose_end_to_end(tmp_path):
    steps = {"pretrain_steps": 150, "full_steps": 80, "sparse_steps": 80}
    flags = [f"--config.{k}={v}" for k, v in steps.items()] + ["--config.progress=False",
                                                              "--config.eval_every=40"]
    proc = subprocess.run([sys.executable, "-m", "experiments.compose", "--config=experiments/configs/compose.py",
                           *flags, f"--config.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("metrics.jsonl", "results.json", "results.png"):
        assert (tmp_path / f).stat().st_size > 0, f

    table = proc.stdout[proc.stdout.index("variant  "):]
    for name in VARIANTS:
        assert any(line.startswith(name + "  ") for line in table.splitlines()), (name, table)

    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == steps["pretrain_steps"] + 2 * (steps["full_steps"] + steps["sparse_steps"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["variants"]) == VARIANTS
    acc = {n: v["acc"] for n, v in results["variants"].items()}
    assert acc["pretrained"]["source"] > 0.9
    # Each sparse diff learns its own task and knows nothing of the other one's digits ...
    assert acc["LT-SFT A"]["a"] > 0.9 and acc["LT-SFT A"]["b"] < 0.1
    assert acc["LT-SFT B"]["b"] > 0.9 and acc["LT-SFT B"]["a"] < 0.1
    # ... their sum serves both: on digits 5-9 it beats either diff alone by a wide margin
    # (about 90% vs at most 61% over seeds 0-3 with these settings; the single diffs are capped
    # at the share of their own digits, 60% and 40%).
    merged = acc["LT-SFT A+B (sum)"]
    assert merged["ab"] > max(acc["LT-SFT A"]["ab"], acc["LT-SFT B"]["ab"]) + 0.15
    assert min(merged["a"], merged["b"]) > 0.5 and merged["source"] > 0.8
    # a sum has the union of the two supports: at most their total, less the shared entries
    v = results["variants"]
    assert v["LT-SFT A+B (sum)"]["trained"] == v["LT-SFT A"]["trained"] + v["LT-SFT B"]["trained"]
    assert v["LT-SFT A+B (sum)"]["nonzero_diff"] <= v["LT-SFT A+B (sum)"]["trained"]


@pytest.mark.parametrize("overrides, message", [
    ({"full_steps": 0}, r"config.full_steps=0 must be an int >= 1"),
    ({"sparse_steps": -5}, r"config.sparse_steps=-5 must be an int >= 1"),
    ({"sparse_lr": 0.0}, r"config.sparse_lr=0.0 must be a finite number > 0"),
    ({"full_lr": float("nan")}, r"config.full_lr=nan must be a finite number > 0"),
    ({"l1": -1.0}, r"config.l1=-1.0 must be a finite number >= 0"),
    ({"pretrain_steps": 0, "batch_size": 0}, r"config.pretrain_steps=0 must be an int >= 1; config.batch_size=0"),
    ({"replay": 1.0}, r"config.replay=1.0 must be in \[0, 1\) \(the fraction of each fine-tuning batch"),
    ({"replay": 0.995}, r"config.replay=0.995 leaves no task example in a batch of config.batch_size=64; lower "
                       r"--config.replay"),
    ({"density": 0.0}, r"config.density: sparse.lt_sft: density=0.0 must be in \(0, 1\].*Fix --config.density"),
    ({"task_b": (4, 9)}, r"config.source=\(0, 1, 2, 3, 4\), config.task_a=\(5, 6, 7\), config.task_b=\(4, 9\) must "
                         r"be non-empty disjoint sets of digits 0-9"),
    ({"task_a": (5, 10)}, r"config.task_a=\(5, 10\).*digits 0-9"),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_a_bad_config_is_refused_before_anything_runs(tmp_path, overrides, message):
    """The runner's range checks (experiments.run.check_ranges) with this experiment's keys, before any output."""
    config = compose_config.get_config()
    config.update_from_flattened_dict({**overrides, "output_dir": str(tmp_path / "out")})
    with pytest.raises(rp.ReparamError, match=message):
        C.run(config)
    assert not (tmp_path / "out").exists()


def test_cli_lists_an_unknown_key_with_near_matches_and_exits_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.compose", "--config=experiments/configs/compose.py",
                           "--config.sparse_stpes=3", f"--config.output_dir={tmp_path / 'out'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("experiments.compose: unknown config key: 'sparse_stpes' (did you mean 'sparse_steps'"
            in proc.stderr)
    assert not (tmp_path / "out").exists()
