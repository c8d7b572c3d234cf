"""Tweets as instruction following with SmolLM2 (experiments/configs/smollm_tweets.py), on the first layers of the
real weights: the chat examples, the routed hot path on the scanned model, and a short LoRA run that beats
the zero-shot accuracy."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reparam as rp
from experiments import run as R
from experiments import tasks
from experiments.configs import smollm_tweets
from experiments.data import tweets
from experiments.models import llama
from tests.hlo import dot_shapes


@pytest.fixture(scope="module")
def small():
    return llama.load_smollm2(layers=2)


def test_chat_examples_are_the_chat_template_tokenized(small):
    """Each example's tokens are those of the whole chat (user turn = instruction + tweet, assistant turn = the
    label word) tokenized at once, cut after the answer; the answer sits at ``answer_at``."""
    tok = small[2]
    data = tweets.chat_examples(tok, seq_len=160)
    texts, labels = tweets.read()
    idx = tweets.split_indices(labels)["train"][:150]
    split = data["train"]
    for row, i in enumerate(idx):
        whole = tok.encode(tok.chat([{"role": "user", "content": f"{tweets.INSTRUCTION}\n\n{texts[i]}"},
                                     {"role": "assistant", "content": tweets.LABELS[labels[i]]}],
                                    add_generation_prompt=False))[:-1]          # the template's final "\n"
        n = int(split["attention_mask"][row].sum())
        assert split["input_ids"][row, :n].tolist() == whole
        assert split["input_ids"][row, split["answer_at"][row]] == data["label_ids"][split["label"][row]]
    with pytest.raises(ValueError, match="seq_len=40 leaves"):
        tweets.chat_examples(tok, seq_len=40)


def test_lora_step_on_the_scanned_model_routes_every_projection(small):
    """The scanned SmolLM2 layers' 7 projections are each routed; the compiled LoRA step has no dot that
    contracts the batch's tokens into a weight-sized result, while plain autodiff has (so the check can fail)."""
    model, params, tok = small
    data = tweets.chat_examples(tok, seq_len=64)
    loss_fn, _, _ = tasks.answer_fns(model, data["label_ids"])
    batch = {k: v[:5] for k, v in data["train"].items()}     # 320 tokens: no weight dimension (192, 576, 1536)
    c = smollm_tweets.get_config()
    plan = rp.plan([(c.adapted, rp.lora(4, 8.0))], params, stacked=c.stacked)
    frozen, trainable = plan.init(jax.random.key(0), params)
    opt = optax.adam(1e-3)
    state = rp.train.init_state(trainable, opt, jax.random.key(1))
    sizes = {tuple(sorted(leaf.shape[1:])) for leaf in plan.leaves if leaf.transform is not None}
    weight_grads = {}
    for mode in ("auto", "autodiff"):
        step = rp.train.make_train_step(plan, loss_fn, opt, matmul=mode, donate=False)
        hlo = step.lower(state, frozen, batch).compile().as_text()
        weight_grads[mode] = [d for d in dot_shapes(hlo) if tuple(sorted(n for n in d[0] if n != 1)) in sizes
                              and int(np.prod(d[1])) == batch["input_ids"].size]
        if mode == "auto":
            uses = [u for s in step.routing.uses.values() for u in s.values()]
            assert len(uses) == 7 and all(u.route != "autodiff" for u in uses)
    assert weight_grads["autodiff"] and not weight_grads["auto"]


@pytest.mark.slow
def test_short_lora_run_beats_zero_shot(tmp_path):
    """30 LoRA steps on the first 4 layers of SmolLM2 lower the answer loss and raise validation and test accuracy
    over the zero-shot model's (a 4-layer truncation answers below chance: 24% of the first 128 validation tweets)."""
    c = smollm_tweets.get_config()
    c.update({"layers": 4, "methods": "lora", "adapt_steps": 30, "eval_every": 15, "val_examples": 128,
              "test_examples": 128, "output_dir": str(tmp_path), "progress": False})
    c.method_lr.lora = 1e-3
    results = R.run(c)
    lora = results["methods"]["lora"]
    assert results["start"] == "zero-shot" and results["start_test_acc"] is not None
    assert lora["monitor_acc"] > results["untrained_head_acc"] + 0.05
    assert lora["acc"] > results["start_test_acc"] + 0.1
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl")))]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert lora["trainable"] == 4 * 8 * (3 * (576 + 1536) + 2 * 1152 + 2 * 768)     # 4 layers, r=8
    assert lora["tokens_per_s"] > 0 and os.path.exists(os.path.join(tmp_path, "results.png"))


@pytest.mark.slow
def test_lora_on_the_gguf_blocks(tmp_path, capsys):
    """``base_format="gguf"``: the runner trains LoRA on the file's own Q4_1 blocks (the 7 stacked projections,
    never re-quantised; the Q8_0 embedding dequantised like every non-adapted leaf) and reports their bytes:
    Q4_1 holds 32 weights in 16 bytes of codes + an f16 scale and min, 0.625 bytes a weight."""
    c = smollm_tweets.get_config()
    c.update({"layers": 2, "methods": "lora", "adapt_steps": 2, "eval_every": 2, "val_examples": 8,
              "test_examples": 8, "eval_chunk": 8, "batch_size": 4, "timing_warmup": 1, "base_format": "gguf",
              "output_dir": str(tmp_path), "progress": False})
    results = R.run(c)
    lora = results["methods"]["lora"]
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3                    # q, o; k, v; gate, up, down
    assert f"q4_1: 7 arrays, {2 * per_layer * 5 // 8:,} bytes (0.156 of f32)" in lora["frozen"], lora["frozen"]
    assert "q8_0" not in lora["frozen"] and "GGUF Q4_1 blocks kept" in results["notes"][0]
    assert f"[lora] {lora['frozen']}" in capsys.readouterr().out
    assert all(np.isfinite(r["loss"]) for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl"))))
