"""The Flax MiniLM against transformers' torch BertModel (stored reference), and the tweets data.

A short LoRA fine-tune of MiniLM on the tweets runs in tests/test_tweets_experiment.py.

The reference (tests/data/minilm_reference.json) was made once by tests/data/make_minilm_reference.py.
"""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reparam as rp
from flax.traverse_util import flatten_dict

from experiments.data import tweets
from experiments.models import bert

REF = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def minilm():
    return bert.load_minilm()


def test_params_paths_shapes_and_count(minilm):
    model, params, tokenizer = minilm
    flat = flatten_dict(params, sep="/")
    n = sum(a.size for a in flat.values())
    assert n == 22_713_216 and f"{n / 1e6:.1f}M" == "22.7M"            # BertModel, pooler included
    assert n - sum(a.size for k, a in flat.items() if k.startswith("pooler/")) == 22_565_376
    assert flat["layer_0/attention/query/kernel"].shape == (384, 384)
    assert flat["layer_5/intermediate/kernel"].shape == (384, 1536)
    assert flat["layer_5/output/kernel"].shape == (1536, 384)            # [d_in, d_out]
    assert flat["layer_3/attention_norm/scale"].shape == (384,)
    assert flat["embeddings/word/embedding"].shape == (30522, 384)
    assert all(a.dtype == jnp.float32 for a in flat.values())
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
    assert tokenizer.get_vocab_size() == 30522


def test_embeddings_match_transformers_reference(minilm):
    model, params, tokenizer = minilm
    batch = bert.tokenize(tokenizer, REF["sentences"], seq_len=128)   # the reference padded to 53 tokens
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (len(REF["sentences"]), 128)
    ids = [row[m == 1].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert ids == REF["input_ids"]
    emb = np.asarray(bert.sentence_embeddings(model, params, batch["input_ids"], batch["attention_mask"]))
    np.testing.assert_allclose(emb, np.array(REF["embeddings"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    _, pooled = jax.jit(model.apply)({"params": params}, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(pooled), np.array(REF["pooler_output"]), rtol=0, atol=1e-5)


def test_token_types_and_truncation(minilm):
    model, params, tokenizer = minilm
    pair = REF["pair"]
    ids, types = jnp.array([pair["input_ids"]]), jnp.array([pair["token_type_ids"]])
    emb = bert.sentence_embeddings(model, params, ids, jnp.ones_like(ids), types)
    np.testing.assert_allclose(np.asarray(emb[0]), np.array(pair["embedding"]), rtol=0, atol=1e-5)
    untyped = bert.sentence_embeddings(model, params, ids, jnp.ones_like(ids))
    assert np.abs(np.asarray(untyped[0]) - np.array(pair["embedding"])).max() > 1e-3   # the types do matter
    long = bert.tokenize(tokenizer, [REF["sentences"][-1]], seq_len=16)
    assert long["input_ids"][0].tolist() == REF["input_ids"][-1][:15] + [102]       # [CLS] ... [SEP] kept
    assert long["attention_mask"].sum() == 16


def test_bf16_compute_stays_close(minilm):
    _, params, tokenizer = minilm
    model, _, _ = bert.load_minilm(jnp.bfloat16)
    batch = bert.tokenize(tokenizer, REF["sentences"], seq_len=64)
    hidden, _ = jax.eval_shape(model.apply, {"params": params}, batch["input_ids"], batch["attention_mask"])
    assert hidden.dtype == jnp.bfloat16
    emb = np.asarray(bert.sentence_embeddings(model, params, batch["input_ids"], batch["attention_mask"]))
    assert emb.dtype == np.float32
    assert (emb * np.array(REF["embeddings"])).sum(1).min() > 0.999                 # cosine to the f32 reference


def test_classifier_params_and_rules():
    clf, params, tokenizer = bert.minilm_classifier(jax.random.key(0), n_classes=3)
    assert set(params) == {"encoder", "head"}
    assert params["head"]["kernel"].shape == (384, 3) and not params["head"]["bias"].any()
    batch = bert.tokenize(tokenizer, REF["sentences"][:3], seq_len=32)

    @jax.jit
    def both(params, ids, mask):
        hidden, _ = bert.Bert().apply({"params": params["encoder"]}, ids, mask)
        pooled = bert.mean_pool(hidden, mask)
        return clf.apply({"params": params}, ids, mask), pooled @ params["head"]["kernel"] + params["head"]["bias"]

    logits, expect = both(params, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expect), rtol=1e-5, atol=1e-5)
    plan = rp.plan([(r".*/(query|value)/kernel", rp.lora(8, alpha=16)), (r"head/.*", rp.full())], params)
    _, trainable = plan.init(jax.random.key(1), params)
    adapted = {k.rsplit("/", 1)[0] for k in flatten_dict(trainable, sep="/") if not k.startswith("head/")}
    assert adapted == {f"encoder/layer_{i}/attention/{m}/kernel" for i in range(6) for m in ("query", "value")}
    assert sum(a.size for a in jax.tree.leaves(trainable)) == 12 * 2 * 8 * 384 + 384 * 3 + 3


def test_tweets_rows_and_split():
    texts, labels = tweets.read(dedupe=False)
    assert len(texts) == 38_158 and np.bincount(labels).tolist() == [16_186, 15_018, 6_954]
    texts, labels = tweets.read()
    assert len(texts) == len(set(texts)) == 37_243 and labels.dtype == np.int32
    split = tweets.split_indices(labels, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 29_795, "validation": 3_724, "test": 3_724}
    assert np.bincount(labels[split["validation"]]).tolist() == [1_598, 1_445, 681]
    assert np.bincount(labels[split["test"]]).tolist() == [1_598, 1_445, 681]
    every = np.concatenate(list(split.values()))
    assert np.array_equal(np.sort(every), np.arange(len(texts)))               # disjoint and complete
    again = tweets.split_indices(labels, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], tweets.split_indices(labels, seed=1)["test"])
    assert np.bincount(labels[split["validation"][:500]]).min() > 50            # shuffled: a prefix is mixed


def test_tweets_batches_are_a_function_of_seed_and_step():
    split = {"label": np.arange(100, dtype=np.int32), "input_ids": np.arange(200, dtype=np.int32).reshape(100, 2)}
    b = tweets.batch(split, 32, seed=3, step=4)
    assert np.array_equal(b["label"], tweets.batch(split, 32, seed=3, step=4)["label"])
    assert np.array_equal(b["input_ids"][:, 0], 2 * b["label"])                  # rows stay aligned
    it = tweets.batches(split, 32, seed=3, start=4)
    assert np.array_equal(next(it)["label"], b["label"])
    assert np.array_equal(next(it)["label"], tweets.batch(split, 32, seed=3, step=5)["label"])
    epoch = np.concatenate([tweets.batch(split, 32, seed=3, step=s)["label"] for s in (3, 4, 5)])
    assert len(set(epoch.tolist())) == 96                                        # 3 steps per epoch, no repeats
    assert not np.array_equal(b["label"], tweets.batch(split, 32, seed=4, step=4)["label"])
    with pytest.raises(ValueError, match="batch_size 101"):
        tweets.batch(split, 101, seed=0, step=0)
