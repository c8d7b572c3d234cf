"""Reference Flax models for the experiments: ``mlp`` (MLP) and ``bert`` (BERT encoder, all-MiniLM-L6-v2)."""
from experiments.models import bert
from experiments.models.bert import Bert, BertClassifier, BertConfig, load_minilm, minilm_classifier
from experiments.models.mlp import MLP

__all__ = ["MLP", "bert", "Bert", "BertClassifier", "BertConfig", "load_minilm", "minilm_classifier"]
