"""The runner refuses a bad config before anything runs (unknown keys with near matches, numeric ranges, the
methods' hyperparameters) and stops on a non-finite training loss with a message and a non-zero exit code."""
import math
import os
import subprocess
import sys

import pytest
import reparam as rp

from experiments.configs import digits as digits_config
from experiments.configs import tweets as tweets_config
from experiments.run import check_config, check_keys, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"methods": "lora", "hidden": (16, 16), "pretrain_steps": 5, "adapt_steps": 5, "batch_size": 32,
        "checkpoint_every": 0, "eval_every": 5, "calib_batches": 1, "progress": False}


def _config(tmp_path, get_config=digits_config.get_config, **overrides):
    config = get_config()
    config.update_from_flattened_dict({**TINY, "output_dir": str(tmp_path / "out"), **overrides})
    return config


@pytest.mark.parametrize("get_config, key, message", [
    (digits_config.get_config, "adapt_stpes", r"unknown config key: 'adapt_stpes' \(did you mean 'adapt_steps'"),
    (digits_config.get_config, "foo", r"unknown config key: 'foo'\. Fix the --config.<key>=value flags"),
    (digits_config.get_config, "checkpoint_evry", r"'checkpoint_evry' \(did you mean 'checkpoint_every'"),
    (tweets_config.get_config, "method_lr.lroa", r"'method_lr.lroa' \(did you mean 'method_lr.lora'"),
    (tweets_config.get_config, "methd_lr.lora", r"'methd_lr.lora' \(did you mean 'method_lr'"),
], ids=lambda v: v if isinstance(v, str) and "(" not in v else None)
def test_unknown_keys_are_listed_with_near_matches(get_config, key, message):
    with pytest.raises(rp.ReparamError, match=message):
        check_keys(get_config(), ["seed", "method_lr.lora" if "method_lr" in get_config() else "rank", key])
    check_keys(get_config(), ["seed", "rank"])        # known keys pass


@pytest.mark.parametrize("overrides, message", [
    ({"adapt_steps": 0}, r"config.adapt_steps=0 must be an int >= 1"),
    ({"pretrain_steps": -3}, r"config.pretrain_steps=-3 must be an int >= 1"),
    ({"batch_size": 0}, r"config.batch_size=0 must be an int >= 1"),
    ({"eval_every": 0}, r"config.eval_every=0 must be an int >= 1"),
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0 must be an int >= 1 \(the newest checkpoints kept per "
                              r"phase; to save none, set checkpoint_every=0\)"),
    ({"checkpoint_every": -1}, r"config.checkpoint_every=-1 must be an int >= 0"),
    ({"adapt_lr": 0.0}, r"config.adapt_lr=0.0 must be a finite number > 0"),
    ({"pretrain_lr": math.nan}, r"config.pretrain_lr=nan must be a finite number > 0"),
    ({"weight_decay": -1e-4}, r"config.weight_decay=-0.0001 must be a finite number >= 0"),
    ({"test_fraction": 1.0}, r"config.test_fraction=1.0 must be in \(0, 1\)"),
    ({"rank": 0}, r"method 'lora': lora: r=0 must be a positive int.*Fix the config key it reads"),
    ({"alpha": -16.0}, r"method 'lora': lora: alpha=-16.0 must be a finite number > 0"),
    ({"methods": "sparse", "density": 2.0}, r"method 'sparse': sparse.random: density=2.0 must be in \(0, 1\]"),
    ({"adapt_steps": 0, "batch_size": -1}, r"adapt_steps=0 must be an int >= 1; config.batch_size=-1 must be"),
    ({"hidden": (16, 0)}, r"config.hidden=\(16, 0\) must be ints >= 1 \(MLP widths\)"),
    ({"methods": "lora,lora"}, r"methods \['lora'\] listed twice"),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_out_of_range_values_are_refused_before_anything_runs(tmp_path, overrides, message):
    config = _config(tmp_path, **overrides)
    with pytest.raises(rp.ReparamError, match=message):
        check_config(config)
    with pytest.raises(rp.ReparamError, match=message):
        run(config)
    assert not (tmp_path / "out").exists()          # refused before anything ran or was written


def test_a_method_learning_rate_is_checked(tmp_path):
    config = _config(tmp_path, tweets_config.get_config)
    config.method_lr.lora = -1e-3
    with pytest.raises(rp.ReparamError, match=r"config.method_lr.lora=-0.001 must be a finite number > 0"):
        check_config(config)


def test_a_diverging_method_stops_with_its_step_and_loss(tmp_path):
    with pytest.raises(FloatingPointError, match=r"\[lora\] step \d+: the training loss is (nan|inf|-inf); stopped, "
                                                 r"nothing of this step saved\. Lower the learning rate \(now 1e\+30"):
        run(_config(tmp_path, adapt_lr=1e30))
    assert not (tmp_path / "out" / "results.json").exists()


def _cli(tmp_path, *flags):
    return subprocess.run([sys.executable, "-m", "experiments.run", "--config=experiments/configs/digits.py",
                           *[f"--config.{k}={v}" for k, v in {**TINY, "output_dir": tmp_path / "out"}.items()],
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=rp.train.huge_pages_env({**os.environ, "JAX_PLATFORMS": "cpu"}))


def test_cli_exits_non_zero_with_the_message(tmp_path):
    proc = _cli(tmp_path, "--config.adapt_stpes=3")
    assert proc.returncode == 1 and "did you mean 'adapt_steps'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _cli(tmp_path, "--config.pretrain_lr=1e30")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "experiments.run: [pretrain] step" in proc.stderr and "the training loss is" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists() and "test acc" not in proc.stdout
