"""One small Llama-style decoder written the four ways JAX LLM code is written.

RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embedding; the same maths in each form:

    "linen"        linen, one module per layer, ``nn.Dense`` projections (``remat=True``: ``nn.remat(Block)``)
    "linen_scan"   linen, ``nn.scan`` over a stacked ``layers`` module (MaxText's layout): ``nn.DenseGeneral`` q/k/v
                   ``[L, d, heads, hd]`` and out ``[L, heads, hd, d]``, ``nn.Einsum`` fused gate/up ``[L, 2, d, ffn]``
                   and down ``[L, ffn, d]`` (``remat=True``: the scanned block under ``nn.remat``, saving the
                   outputs of non-batched dots)
    "nnx"          Flax NNX, ``nnx.Linear`` per layer; the loss merges ``(graphdef, params)`` (``nnx.split``)
    "nnx_scan"     Flax NNX, the layers created by ``nnx.vmap`` (stacked ``[L, d_in, d_out]`` kernels) and run by
                   ``nnx.scan``
    "function"     a plain function of a params dict: ``jax.lax.scan`` over stacked ``[L, d_in, d_out]`` arrays,
                   ``x @ w`` and ``jnp.einsum``, each layer under ``jax.checkpoint``

``make(form, cfg, key) -> (params, loss_fn, rules_for)``: ``loss_fn(params, batch, rng)`` is the next-token
cross-entropy of ``batch = {"ids": int32 [B, T]}``; ``rules_for(t)`` adapts every attention and MLP
projection with transform ``t`` (declaring the matrix views the stacked forms need). Used by the routing
tests and ``benchmarks/decoder_forms.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import reparam as rp

FORMS = ("linen", "linen_scan", "nnx", "nnx_scan", "function")


class Config(NamedTuple):
    vocab: int = 256
    d: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    dtype: str = "float32"          # compute dtype of the linen forms' activations

    @property
    def hd(self) -> int:
        return self.d // self.heads


def rms(x, scale, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def rope(x, theta=10000.0):
    """Rotary embedding of ``x [B, T, heads, hd]`` (rotate-half, as Llama)."""
    t, hd = x.shape[1], x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attend(q, k, v):
    """Causal GQA attention: ``q [B, T, H, hd]``, ``k, v [B, T, KV, hd]`` -> ``[B, T, H, hd]``."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1).astype(v.dtype), v)


def next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


# --- linen, one module per layer --------------------------------------------------------------------
class DenseBlock(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.dtype, name=name)
        h = nn.RMSNorm(dtype=c.dtype, name="attn_norm")(x)
        b, t = x.shape[:2]
        q = rope(dense(c.heads * c.hd, "q")(h).reshape(b, t, c.heads, c.hd))
        k = rope(dense(c.kv_heads * c.hd, "k")(h).reshape(b, t, c.kv_heads, c.hd))
        v = dense(c.kv_heads * c.hd, "v")(h).reshape(b, t, c.kv_heads, c.hd)
        x = x + dense(c.d, "o")(attend(q, k, v).reshape(b, t, c.heads * c.hd))
        h = nn.RMSNorm(dtype=c.dtype, name="mlp_norm")(x)
        return x + dense(c.d, "down")(jax.nn.silu(dense(c.ffn, "gate")(h)) * dense(c.ffn, "up")(h))


class LinenDecoder(nn.Module):
    cfg: Config
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        embed = nn.Embed(c.vocab, c.d, name="embed")
        x = embed(ids).astype(c.dtype)
        block = nn.remat(DenseBlock) if self.remat else DenseBlock
        for i in range(c.layers):
            x = block(c, name=f"layers_{i}")(x)
        return embed.attend(nn.RMSNorm(dtype=c.dtype, name="final_norm")(x))


# --- linen, nn.scan over stacked layers (DenseGeneral / Einsum) ---------------------------------------
class ScanBlock(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x, _):
        c = self.cfg
        h = nn.RMSNorm(dtype=c.dtype, name="attn_norm")(x)
        proj = lambda heads, name: nn.DenseGeneral((heads, c.hd), use_bias=False, dtype=c.dtype, name=name)(h)
        q, k, v = rope(proj(c.heads, "q")), rope(proj(c.kv_heads, "k")), proj(c.kv_heads, "v")
        o = nn.DenseGeneral(c.d, axis=(-2, -1), use_bias=False, dtype=c.dtype, name="o")(attend(q, k, v))
        x = x + o
        h = nn.RMSNorm(dtype=c.dtype, name="mlp_norm")(x)
        gu = nn.Einsum((2, c.d, c.ffn), "btd,gdf->btgf", use_bias=False, dtype=c.dtype, name="gate_up")(h)
        y = nn.Einsum((c.ffn, c.d), "btf,fd->btd", use_bias=False, dtype=c.dtype, name="down")(
            jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1])
        return x + y, None


class ScanDecoder(nn.Module):
    cfg: Config
    remat: bool = False     # the scanned block under nn.remat, saving the projections' outputs (as MaxText)

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        embed = nn.Embed(c.vocab, c.d, name="embed")
        x = embed(ids).astype(c.dtype)
        block = nn.remat(ScanBlock, prevent_cse=False,
                         policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable) if self.remat else ScanBlock
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.layers)
        x, _ = stack(c, name="layers")(x, None)
        return embed.attend(nn.RMSNorm(dtype=c.dtype, name="final_norm")(x))


# --- NNX ------------------------------------------------------------------------------------------------
class NnxBlock(nnx.Module):
    def __init__(self, c: Config, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
        self.c = c
        self.attn_norm, self.mlp_norm = nnx.RMSNorm(c.d, rngs=rngs), nnx.RMSNorm(c.d, rngs=rngs)
        self.q, self.k, self.v = lin(c.d, c.heads * c.hd), lin(c.d, c.kv_heads * c.hd), lin(c.d, c.kv_heads * c.hd)
        self.o = lin(c.heads * c.hd, c.d)
        self.gate, self.up, self.down = lin(c.d, c.ffn), lin(c.d, c.ffn), lin(c.ffn, c.d)

    def __call__(self, x):
        c = self.c
        b, t = x.shape[:2]
        h = self.attn_norm(x)
        q = rope(self.q(h).reshape(b, t, c.heads, c.hd))
        k = rope(self.k(h).reshape(b, t, c.kv_heads, c.hd))
        v = self.v(h).reshape(b, t, c.kv_heads, c.hd)
        x = x + self.o(attend(q, k, v).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class NnxDecoder(nnx.Module):
    def __init__(self, c: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(c.vocab, c.d, rngs=rngs)
        self.layers = nnx.List([NnxBlock(c, rngs) for _ in range(c.layers)]) if hasattr(nnx, "List") else \
            [NnxBlock(c, rngs) for _ in range(c.layers)]
        self.final_norm = nnx.RMSNorm(c.d, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.embed.attend(self.final_norm(x))


class NnxScanDecoder(nnx.Module):
    def __init__(self, c: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(c.vocab, c.d, rngs=rngs)

        @nnx.split_rngs(splits=c.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(c, rngs)
        self.layers = make(rngs)
        self.final_norm = nnx.RMSNorm(c.d, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(layer, x):
            return layer(x)
        return self.embed.attend(self.final_norm(step(self.layers, self.embed(ids))))


# --- a plain function of a dict ---------------------------------------------------------------------------
def function_params(c: Config, key) -> dict:
    ks = iter(jax.random.split(key, 8))
    init = lambda *shape: jax.random.normal(next(ks), shape) / jnp.sqrt(shape[-2])
    L = c.layers
    return {"embed": jax.random.normal(next(ks), (c.vocab, c.d)) / 8,
            "layers": {"q": init(L, c.d, c.heads * c.hd), "k": init(L, c.d, c.kv_heads * c.hd),
                       "v": init(L, c.d, c.kv_heads * c.hd), "o": init(L, c.heads * c.hd, c.d),
                       "gate": init(L, c.d, c.ffn), "up": init(L, c.d, c.ffn), "down": init(L, c.ffn, c.d),
                       "attn_norm": jnp.ones((L, c.d)), "mlp_norm": jnp.ones((L, c.d))},
            "final_norm": jnp.ones((c.d,))}


def function_logits(p: dict, ids, c: Config):
    x = p["embed"][ids]
    b, t = ids.shape

    @jax.checkpoint
    def layer(x, w):
        h = rms(x, w["attn_norm"])
        q = rope((h @ w["q"]).reshape(b, t, c.heads, c.hd))
        k = rope(jnp.einsum("btd,dk->btk", h, w["k"]).reshape(b, t, c.kv_heads, c.hd))
        v = jnp.einsum("btd,dk->btk", h, w["v"]).reshape(b, t, c.kv_heads, c.hd)
        x = x + attend(q, k, v).reshape(b, t, -1) @ w["o"]
        h = rms(x, w["mlp_norm"])
        return x + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"], None

    x, _ = jax.lax.scan(layer, x, p["layers"])
    return rms(x, p["final_norm"]) @ p["embed"].T


# --- the four forms -----------------------------------------------------------------------------------------
PROJ = {"linen": ("q", "k", "v", "o", "gate", "up", "down"), "linen_scan": ("q", "k", "v", "o", "gate_up", "down"),
        "nnx": ("q", "k", "v", "o", "gate", "up", "down"), "nnx_scan": ("q", "k", "v", "o", "gate", "up", "down"),
        "function": ("q", "k", "v", "o", "gate", "up", "down")}


def _rules(form: str, t) -> list:
    """Rules adapting the projections: ``t`` a transform for all of them, or ``{projection: transform}``."""
    table = t if isinstance(t, dict) else {name: t for name in PROJ[form]}
    prefix, suffix = {"linen": (r"layers_\d+/", "/kernel"), "linen_scan": ("layers/", "/kernel"),
                      "nnx": (r"layers/\d+/", "/kernel"), "nnx_scan": ("layers/", "/kernel"),
                      "function": ("layers/", "")}[form]
    rules = []
    for name, tr in table.items():
        if form in ("linen_scan", "nnx_scan", "function"):    # stacked [layers, ...] kernels: an adapter per layer
            tr = rp.on_axes(tr, batch_axes=(0,), **({"in_axes": (2,), "out_axes": (1, 3)} if name == "gate_up" else {}))
        rules.append((prefix + name + suffix, tr))
    return rules


def make(form: str, c: Config = Config(), key=None, *, remat: bool = False):
    """``(params, loss_fn, rules_for)`` of the decoder written as ``form`` (one of :data:`FORMS`);
    ``rules_for(t)`` adapts every projection with ``t``, ``rules_for({"q": t1, ...})`` the named ones."""
    key = jax.random.key(0) if key is None else key
    ids = jnp.zeros((1, 8), jnp.int32)
    rules_for = lambda t: _rules(form, t)
    if form in ("linen", "linen_scan"):
        model = LinenDecoder(c, remat=remat) if form == "linen" else ScanDecoder(c, remat=remat)
        params = model.init(key, ids)["params"]
        loss = lambda p, batch, rng: next_token_loss(model.apply({"params": p}, batch["ids"]), batch["ids"])
        return params, loss, rules_for
    if form in ("nnx", "nnx_scan"):
        graphdef, params = nnx.split((NnxDecoder if form == "nnx" else NnxScanDecoder)(c, nnx.Rngs(key)), nnx.Param)

        def loss(p, batch, rng):
            return next_token_loss(nnx.merge(graphdef, p)(batch["ids"]), batch["ids"])
        return params, loss, rules_for
    if form == "function":
        params = function_params(c, key)
        loss = lambda p, batch, rng: next_token_loss(function_logits(p, batch["ids"], c), batch["ids"])
        return params, loss, rules_for
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def batch(c: Config, n: int = 4, t: int = 16, seed: int = 0) -> dict:
    return {"ids": jax.random.randint(jax.random.key(seed), (n, t), 0, c.vocab)}
