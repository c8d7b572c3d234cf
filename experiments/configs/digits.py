"""Digits 0-4 -> 5-9: pretrain an MLP on one half of the classes, adapt it to the other with every method.

    python -m experiments.run --config=experiments/configs/digits.py
    python -m experiments.run --config=experiments/configs/digits.py \
        --config.adapt_steps=50 --config.methods=lora,pissa
    python -m experiments.run --config=experiments/configs/digits.py --config.resume=True   # after a kill

Runs in about three minutes on 2 CPU cores; --config.methods=all runs every method. ``base_format`` holds the
hidden kernels as pretrained (``"none"``), in bf16, int8 or nf4 (``experiments.run.BASE_FORMATS``) for every method.
"""
import ml_collections

# every family, two or more methods each, in about three minutes; --config.methods=all runs all of
# experiments.methods.METHODS (about six minutes on 2 cores)
DEFAULT_METHODS = ("full,head,"
                   "lora,dora,pissa,corda,"                     # low-rank, SVD-principal
                   "waveft,fourierft,krona,lokr,"               # wavelet / Fourier bases, Kronecker
                   "vera,randlora,sara,sltrain")                # random bases, sparse masks


def get_config() -> ml_collections.ConfigDict:
    """The default digits experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0                      # model init, head re-init, adapter init, batch order, DyLoRA ranks
    c.data_seed = 0                 # the stratified train/test split
    c.test_fraction = 0.25
    c.hidden = (1024, 1024)         # wide enough that a step measures compute, not dispatch
    c.batch_size = 128

    c.pretrain_steps = 400          # full training on digits 0-4
    c.pretrain_lr = 1e-3

    c.adapt_steps = 300             # per method, on digits 5-9 with a fresh 5-way head
    c.adapt_lr = 3e-3
    c.weight_decay = 1e-4           # adamw
    c.eval_every = 25
    c.timing_warmup = 10            # steps left out of the median step time
    c.calib_batches = 4             # target-task batches for CorDA / EVA / LoRA-SB

    c.rank = 8
    c.alpha = 16.0
    c.xs_rank = 32                  # LoRA-XS / LoRA-SB train an r x r core: r^2 parameters
    c.density = 0.02                # sparse supports and WaveFT coefficients, per kernel
    c.fourier_n = 1000              # FourierFT spectral coefficients per kernel
    c.fourier_scale = 150.0         # FourierFT's s (PEFT's default)

    c.base_dtype = "float32"        # pretrained weights cast to this for adaptation ("bfloat16"); trainables f32
    c.base_format = "none"          # the hidden kernels: "none" | "bf16" | "int8" | "nf4" | "nf4_dq" (quantised)
    c.remat = False                 # recompute activations in the backward pass (rp.train.make_train_step)

    c.methods = DEFAULT_METHODS     # comma-separated names from experiments.methods.METHODS, or 'all'
    c.output_dir = "runs/digits"
    c.verbose = False               # print plan.summary() for every method, not just the first adapter
    c.progress = True               # tqdm bars

    c.checkpoint_every = 100        # steps between orbax checkpoints of each phase (0 = none)
    c.keep_checkpoints = 3          # newest checkpoints kept per phase
    c.resume = False                # continue a killed run in output_dir (see experiments/run.py)
    return c
