"""Composable sparse fine-tuning (LT-SFT) on digits: two task diffs, applied alone and summed.

    python -m experiments.compose --config=experiments/configs/compose.py
    python -m experiments.compose --config=experiments/configs/compose.py \
        --config.density=0.02 --config.output_dir=/tmp/compose

Runs in well under a minute on 2 CPU cores.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The default composition experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0                      # model init, batch order
    c.data_seed = 0                 # the stratified train/test split
    c.test_fraction = 0.25
    c.hidden = (256, 256)
    c.batch_size = 64

    # Digits, with their own labels in one 10-way head.
    c.source = (0, 1, 2, 3, 4)      # pretraining classes (replayed during fine-tuning)
    c.task_a = (5, 6, 7)
    c.task_b = (8, 9)

    c.masked_loss = True            # each phase's softmax runs over the classes it trains on only (see
                                    # experiments/compose.py); evaluation is always 10-way
    c.pretrain_steps = 400          # full training on the source digits
    c.pretrain_lr = 1e-3

    # Per task: each batch is half task data, half a replay of the source digits (see experiments/compose.py).
    c.replay = 0.5                  # fraction of each fine-tuning batch drawn from the source digits
    c.full_steps = 200              # LT-SFT phase 1: full fine-tuning theta0 -> theta1
    c.full_lr = 1e-3
    c.density = 0.1                 # fraction of each kernel (hidden and head) in the task's sparse diff
    c.sparse_steps = 200            # LT-SFT phase 2: only the support, from theta0
    c.sparse_lr = 3e-3
    c.l1 = 10.0                     # both phases: loss + l1 * mean|theta - theta0| (LT-SFT's regulariser)

    c.weight_decay = 0.0            # adamw (pulls full fine-tuning toward 0, not toward theta0)
    c.eval_every = 50
    c.timing_warmup = 10            # steps left out of the median step time

    c.output_dir = "runs/compose"
    c.progress = True               # tqdm bars
    return c
