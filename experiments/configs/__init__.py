"""``get_config()`` files, one per experiment; load with ``--config=experiments/configs/<name>.py``."""
