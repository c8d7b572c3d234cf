"""The runner refuses a bad config before anything runs (unknown keys with near matches, numeric ranges, the
methods' hyperparameters, an unknown base format) and stops on a non-finite training loss with a message and a
non-zero exit code. A base format holds the adapted kernels quantised (or in bf16) under every method."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import reparam as rp
import safetensors.numpy

from experiments import report
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
    ({"base_format": "nf5"}, r"config.base_format='nf5' must be one of 'none', 'bf16', 'int8', 'nf4', 'nf4_dq', "
                             r"'gguf'\. Fix the config"),
    ({"base_format": "gguf"}, r"config.base_format='gguf' must be one of 'none', 'bf16', 'int8', 'nf4', 'nf4_dq' for "
                              r"task 'digits' \('gguf' is the GGUF file's own blocks: tasks smollm_tweets\)"),
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


# --- base_format: the adapted kernels quantised (or cast) before every method's plan ---------------------------
# digits with hidden (64, 64): the frozen tree of a LoRA run holds both 64 x 64 hidden kernels (their format) and
# both biases (f32, 512 bytes); int8: 4,096 codes + 64 f32 scales; nf4 with double quantisation: 2,048 bytes of
# codes + its 64 scales as one u8 block of 256 (256 codes, an f32 scale and min); bf16: 8,192 bytes
LORA_FROZEN = {"none": 2 * 16_384 + 512, "int8": 2 * (4_096 + 256) + 512, "nf4_dq": 2 * (2_048 + 264) + 512,
               "bf16": 2 * 8_192 + 512}


@pytest.mark.parametrize("fmt", ["int8", "nf4_dq", "bf16"])
def test_base_format_quantises_the_adapted_kernels_for_every_method(tmp_path, capsys, fmt):
    """LoRA keeps the hidden kernels in the format (its frozen bytes, logged and in the table); CorDA calibrates on
    the dequantised model and keeps its residuals in the format; full fine-tuning trains the kernels from their
    dequantised values, and says so."""
    out = run(_config(tmp_path, hidden=(64, 64), methods="full,lora,corda", base_format=fmt))
    log = capsys.readouterr().out
    lora, full = out["methods"]["lora"], out["methods"]["full"]
    assert lora["frozen_bytes"] == LORA_FROZEN[fmt] < LORA_FROZEN["none"]
    assert full["frozen_bytes"] == 0                                        # every leaf trained
    quantised = fmt != "bf16"
    assert (f"[full] base_format={fmt!r}: 2 quantised kernels are trained in full, from their dequantised values "
            "in float32; nothing of them stays quantised" in log) == quantised
    held = {"int8": "int8: 2 arrays", "nf4_dq": "nf4: 2 arrays", "bf16": "unquantised: 4 arrays"}[fmt]
    assert f"[lora] frozen: {LORA_FROZEN[fmt]:,} bytes ({held}" in log
    corda = next(line for line in log.splitlines() if line.startswith("[corda] frozen: "))
    assert held in corda and 0.0 <= out["methods"]["corda"]["acc"] <= 1.0
    assert out["base_format"]["name"] == fmt and out["precision"]["base"] == ("bfloat16,float32" if fmt == "bf16"
                                                                              else "float32")
    assert 0.0 <= lora["acc"] <= 1.0 and math.isfinite(lora["test_loss"])
    table = report.table(out)
    assert f"base format: {fmt}: the adapted kernels ('.*hidden_\\d+/kernel') " in table, table
    header = table.splitlines()[0].split()
    assert header[-4:] == ["frozen", "MB", "peak", "MB"]


def test_a_format_that_does_not_fit_a_kernel_names_the_key(tmp_path):
    with pytest.raises(rp.ReparamError, match=r"config.base_format='nf4' on the adapted kernels \(config.adapted="
                                              r"'\.\*hidden_\\d\+/kernel'\): quantize: parameter 'hidden_1/kernel' "
                                              r"\(16, 16\): nf4 blocks of 64 .* Choose another base_format"):
        run(_config(tmp_path, base_format="nf4"))                           # hidden (16, 16)


@pytest.mark.slow
def test_lora_on_an_nf4_minilm_trains_and_reports_nf4_bytes(tmp_path, capsys):
    """The tweets task with its 36 MiniLM kernels in nf4 (6 layers x (4 x 384² + 2 x 384 x 1,536) = 10,616,832
    weights at 0.5625 bytes: 4-bit codes + an f32 scale per 64) trains LoRA on them and reports their bytes."""
    config = _config(tmp_path, tweets_config.get_config, methods="lora", base_format="nf4", adapt_steps=3,
                     eval_every=3, batch_size=8, val_examples=16, test_examples=16, eval_chunk=16, timing_warmup=1)
    out = run(config)
    log = capsys.readouterr().out
    lora = out["methods"]["lora"]
    assert "nf4: 36 arrays, 5,971,968 bytes (0.141 of f32)" in lora["frozen"], lora["frozen"]
    assert f"[lora] {lora['frozen']}" in log and "adapted kernels nf4 (QLoRA's 4-bit NormalFloat" in log
    assert lora["frozen_bytes"] < 90_000_000 - 0.8 * 4 * 10_616_832          # MiniLM's f32 frozen tree: ~90 MB
    trained = safetensors.numpy.load_file(str(tmp_path / "out" / "lora" / "trainable.safetensors"))
    b = [v for k, v in trained.items() if k.endswith("/B")]
    assert len(b) == 36 and all(np.abs(v).max() > 0 for v in b)             # B starts at 0: the steps moved it
    assert all(math.isfinite(r["loss"]) for r in report.read_jsonl(str(tmp_path / "out" / "metrics.jsonl")))
    assert "base format: nf4: the adapted kernels" in report.table(out)
