"""SmolLM2-135M-Instruct in Flax (experiments.models.llama) against transformers on the same GGUF file.

transformers dequantises the file with its own code and runs ``LlamaForCausalLM`` in f32 on torch CPU; our
model dequantises with the ``gguf`` package and runs the scanned linen decoder in f32 on XLA:CPU. The two
are different programs, so logits are compared to 1e-3 (the argmax exactly); token ids and greedy
continuations are integers and compared exactly.
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import llama

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n",
         "Prices rose 12.5% in 2024: \u20ac1,234.56 \u2192 \U0001F600\U0001F389 na\u00efve caf\u00e9 \u6771\u4eac 0x1F",
         "  leading spaces\ttabs\r\nand\n\nblank lines  "]


@pytest.fixture(scope="module")
def smol():
    return llama.load_smollm2()


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(llama.smollm2_path())
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


def chat_prompt(tok, text="What is the capital of France?"):
    return tok.chat([{"role": "user", "content": text}])


def test_config_comes_from_the_gguf_metadata(smol):
    model, params, _ = smol
    c = model.cfg
    assert (c.vocab, c.d, c.layers, c.heads, c.kv_heads, c.ffn, c.rope_theta, c.tied) == \
        (49152, 576, 30, 9, 3, 1536, 100000.0, True)
    assert params["layers"]["q_proj"]["kernel"].shape == (30, 576, 576)      # stacked for nn.scan
    assert params["layers"]["k_proj"]["kernel"].shape == (30, 576, 192)
    assert "lm_head" not in params                                           # tied to embed_tokens


@pytest.mark.peft
def test_tokenizer_equals_transformers(smol, hf):
    tok, htok = smol[2], hf[1]
    for text in TEXTS + [chat_prompt(tok)]:
        ids = tok.encode(text)
        assert ids == htok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user")[0] == htok.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.peft
def test_logits_and_greedy_generation_equal_transformers(smol, hf):
    import torch
    model, params, tok = smol
    for text in TEXTS[:2] + [chat_prompt(tok)]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = hf[0](torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))[0]
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    ids = tok.encode(chat_prompt(tok))
    with torch.no_grad():
        ref = hf[0].generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    ours = llama.generate(model, params, [ids], max_new=16, eos_id=tok.eos_id)[0]
    assert ours == ref[:len(ours)] and (len(ours) == 16 or ours[-1] == tok.eos_id)
    assert tok.decode(ours) == "The capital of France is Paris."


@pytest.mark.peft
def test_peft_export_loads_into_transformers_with_the_same_effect(smol, hf, tmp_path):
    """A LoRA on the scanned model (stacked kernels), exported with ``module_map=llama.hf_module``, loads with
    ``peft`` into transformers' model of the same GGUF: the adapted logits agree to 1e-3 (the two bases differ
    by ~1.5e-4) and the adapter's effect on them (adapted - base, up to ~1 here) to 3e-4 (0.05% of the
    entries differ by more than 1e-4: f32 rounding of two programs)."""
    import torch
    from peft import PeftModel
    import reparam as rp
    from tests.methods import perturb
    model, params, tok = smol
    plan = rp.plan([(r"layers/(q|v|down)_proj/kernel", rp.lora(4, alpha=8))], params, stacked=r"layers/.*")
    frozen, trainable = plan.init(jax.random.key(0), params)
    trainable = perturb(trainable, jax.random.key(1), 0.02)
    rp.interop.peft.export(plan, frozen, trainable, str(tmp_path), module_map=llama.hf_module,
                           base_modules=[n for n, _ in hf[0].named_modules()])
    ids = tok.encode(chat_prompt(tok))
    ours = lambda p: np.asarray(model.apply({"params": p}, jnp.asarray([ids])))[0]
    base, adapted = ours(params), ours(plan.merge(frozen, trainable))
    peft_model = PeftModel.from_pretrained(hf[0], str(tmp_path)).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            ref_base = peft_model(torch.tensor([ids])).logits[0].numpy()
    peft_model.unload()
    assert np.abs(adapted - base).max() > 0.05                         # the adapter changes the logits
    np.testing.assert_allclose(adapted, ref, atol=1e-3, rtol=0)
    np.testing.assert_allclose(adapted - base, ref - ref_base, atol=3e-4, rtol=0)
    with pytest.raises(ValueError, match="not a Llama layer's projection"):
        llama.hf_module("embed_tokens/embedding")


def test_cached_generation_equals_full_recomputation(smol):
    """Batched, left-padded greedy decoding over the KV cache picks, at every step, the argmax of a full
    forward over the unpadded prefix (no cache) -- for two prompts of different lengths, per-layer and
    scanned alike."""
    tok = smol[2]
    model, p2, _ = llama.load_smollm2(layers=2)
    prompts = [tok.encode("Hello, my name is"), tok.encode(chat_prompt(tok, "Name a colour."))]
    out = llama.generate(model, p2, prompts, max_new=4)
    for ids, cont in zip(prompts, out):
        seq = list(ids)
        for t in cont:
            lg = model.apply({"params": p2}, jnp.asarray([seq]))[0, -1]
            assert int(jnp.argmax(lg)) == t
            seq.append(t)
    unstacked, pu, _ = llama.load_smollm2(layers=2, scan=False)
    assert llama.generate(unstacked, pu, prompts, max_new=4) == out


def test_sampling_is_seeded_and_compiles_once(smol):
    model, params, tok = llama.load_smollm2(layers=2)
    ids = [tok.encode("Once upon a time")]
    key = jax.random.key(3)
    a = llama.generate(model, params, ids, max_new=8, temperature=0.8, top_k=20, key=key)
    run = llama._generator(model, 8, 0.8, 20)
    before = run._cache_size()
    b = llama.generate(model, params, ids, max_new=8, temperature=0.8, top_k=20, key=key)
    assert a == b and run._cache_size() == before == 1                # one program for all 8 tokens
    c = llama.generate(model, params, ids, max_new=8, temperature=0.8, top_k=20, key=jax.random.key(4))
    assert len(c[0]) == 8
    with pytest.raises(ValueError, match="needs key"):
        llama.generate(model, params, ids, max_new=4, temperature=1.0)


def test_bfloat16_compute_stays_close(smol):
    model, params, tok = smol
    bf = llama.Llama(model.cfg._replace(dtype="bfloat16", layers=30))
    ids = jnp.asarray([tok.encode(TEXTS[0])])
    a = model.apply({"params": params}, ids)
    b = bf.apply({"params": params}, ids)
    assert b.dtype == jnp.float32
    assert float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) >= 0.8


def test_bad_files_fail_clearly(tmp_path):
    import gguf
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        llama.from_gguf(str(tmp_path / "nope.gguf"))
    cut = tmp_path / "cut.gguf"
    with open(llama.smollm2_path(), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(ValueError, match="cut.gguf.*truncated"):
        llama.from_gguf(str(cut))
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="gpt2.gguf.*'gpt2' model.*Llama"):
        llama.from_gguf(str(other))
    with pytest.raises(ValueError, match="layers=31"):
        llama.load_smollm2(layers=31)
    shutil.rmtree(tmp_path, ignore_errors=True)
