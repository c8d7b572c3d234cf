"""Reference Flax models for the experiments."""
from experiments.models.mlp import MLP

__all__ = ["MLP"]
