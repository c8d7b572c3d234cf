"""Tweet sentiment with all-MiniLM-L6-v2: full fine-tuning and transforms side by side, at matched budgets.

    python -m experiments.run --config=experiments/configs/tweets.py            # the README's main command
    python -m experiments.run --config=experiments/configs/tweets.py --config.methods=all \
        --config.adapt_steps=300 --config.output_dir=runs/tweets_all            # every method
    python -m experiments.run --config=experiments/configs/tweets.py --config.method_lr.lora=2e-3
    python -m experiments.run --config=experiments/configs/tweets.py --config.base_format=nf4  # QLoRA, QPiSSA, ...

Matched budgets: every method sees the same batches (``adapt_steps`` x ``batch_size`` tweets, in the same
order), the same sequence length, optimizer (AdamW, weight decay ``weight_decay``), seed and evaluation;
adapters go on all 36 attention query/key/value/output and feed-forward kernels, and the 3-way head is
trained in full. What differs is the transform, with its paper's / PEFT's defaults (rank 8, alpha 16;
VeRA r=256; RandLoRA r=32; FourierFT 1,000 coefficients, WaveFT and the sparse masks 2% of each kernel)
and its learning rate (``method_lr``; ``adapt_lr`` for a method not listed): common values for each kind
(full fine-tuning of a BERT 5e-5; SVD-initialised adapters, which start on the principal directions,
1e-4; low-rank and Kronecker adapters 1e-3; few-parameter ones 3e-3 to 1e-2). The test split is used only
for each method's final accuracy; the curves are on the validation sample.

``base_format`` holds the 36 adapted kernels as they are (``"none"``), in bf16, int8, nf4 or nf4 with double
quantisation (``experiments.run.BASE_FORMATS``): every method then trains on that frozen base.

``--config.methods=all`` runs every method of ``experiments.methods.METHODS``. Timing: each method is 60
train steps plus one pass over the 3,724 test tweets; the default (four methods) took 7 min 56 s on 2 idle
cores (per method 102-127 s, of which the test evaluation ~40 s).
"""
import ml_collections

# full fine-tuning and the low-rank, Kronecker and random-basis families' usual representatives: what fits
# the default's 10-minute budget on 2 cores (--config.methods=all runs every family, e.g. pissa, waveft, sparse)
DEFAULT_METHODS = "full,lora,lokr,vera"
ADAPTED = r"encoder/layer_\d+/(attention/(query|key|value|output)|intermediate|output)/kernel"


def get_config() -> ml_collections.ConfigDict:
    """The default tweets experiment."""
    c = ml_collections.ConfigDict()
    c.task = "tweets"
    c.seed = 0                      # head init, adapter init, batch order
    c.data_seed = 0                 # the stratified train / validation / test split (experiments.data.tweets)
    c.seq_len = 64                  # tokens per tweet (truncates 0.2%)
    c.batch_size = 16
    c.adapted = ADAPTED

    c.adapt_steps = 60              # per method
    c.adapt_lr = 1e-3               # the learning rate of a method method_lr does not list
    c.method_lr = ml_collections.ConfigDict({
        "full": 5e-5, "head": 3e-3,
        "lora": 1e-3, "rslora": 3e-4, "dora": 1e-3, "pissa": 1e-4, "pissa_rsvd": 1e-4, "milora": 1e-3,
        "corda": 1e-4, "eva": 1e-3, "dylora": 1e-3, "lora_xs": 3e-3, "lora_sb": 3e-3, "svfit": 3e-3,
        "sorsa": 1e-3, "waveft": 3e-3, "wara": 1e-3, "fourierft": 3e-3, "krona": 1e-3, "lokr": 1e-3,
        "compacter": 3e-3, "soka": 1e-3, "vera": 1e-2, "nola": 3e-3, "randlora": 3e-3, "sparse": 1e-3,
        "sara": 1e-3, "spt": 1e-3, "s2ft": 1e-3, "sltrain": 1e-3})
    c.weight_decay = 0.0            # adamw
    c.eval_every = 20               # validation accuracy on val_examples tweets
    c.val_examples = 256            # the first of the (shuffled) validation split
    c.test_examples = 0             # 0: the whole test split (a smaller number: quick runs and tests only)
    c.eval_chunk = 256              # tweets per evaluation call
    c.timing_warmup = 3             # steps left out of the median step time
    c.calib_batches = 4             # batches for CorDA / EVA / LoRA-SB / SPT

    c.rank = 8
    c.alpha = 16.0
    c.xs_rank = 32                  # LoRA-XS / LoRA-SB train an r x r core: r^2 parameters
    c.density = 0.02                # sparse supports and WaveFT coefficients, per kernel
    c.fourier_n = 1000              # FourierFT spectral coefficients per kernel
    c.fourier_scale = 150.0         # FourierFT's s (PEFT's default)

    c.base_dtype = "float32"        # "bfloat16": the pretrained weights; trainables and optimizer state f32
    c.base_format = "none"          # the adapted kernels: "none" | "bf16" | "int8" | "nf4" | "nf4_dq" (quantised)
    c.remat = False

    c.methods = DEFAULT_METHODS
    c.output_dir = "runs/tweets"
    c.verbose = False
    c.progress = True
    c.checkpoint_every = 0          # steps between orbax checkpoints of each phase (0 = none)
    c.keep_checkpoints = 3
    c.resume = False
    return c
