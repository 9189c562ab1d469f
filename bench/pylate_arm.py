"""PyLate's arm of `bench/pylate_check.py`: load a ColBERT-X folder with PyLate and encode the texts.

Run by the python of the venv that `common.peer_python` makes for `common.PEERS["pylate"]` (PyLate 1.6 pins its own
transformers), so it imports nothing from td-ray:

    $PY bench/pylate_arm.py --model DIR --texts TEXTS.json --out OUT.npz

TEXTS.json holds {"queries": [...], "documents": [...]}; OUT.npz gets `query_<i>` and `document_<i>` arrays (one
vector per token PyLate keeps) and `settings`, a JSON string of what PyLate read from the folder.
"""
from __future__ import annotations

import argparse
import json
from importlib import metadata

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from pylate import models

    texts = json.loads(open(args.texts, encoding="utf-8").read())
    model = models.ColBERT(model_name_or_path=args.model, device="cpu")
    queries = model.encode(texts["queries"], is_query=True, convert_to_numpy=True)
    documents = model.encode(texts["documents"], is_query=False, convert_to_numpy=True)
    settings = {name: getattr(model, name, None) for name in (
        "query_prefix", "document_prefix", "query_length", "document_length", "attend_to_expansion_tokens",
        "do_query_expansion")}
    settings["skiplist_words"] = len(getattr(model, "skiplist_words", None) or [])
    settings["versions"] = {name: metadata.version(name) for name in ("pylate", "sentence-transformers",
                                                                      "transformers", "torch")}
    settings["modules"] = [type(module).__name__ for module in model]
    arrays = {f"query_{i}": np.asarray(vectors, np.float32) for i, vectors in enumerate(queries)}
    arrays |= {f"document_{i}": np.asarray(vectors, np.float32) for i, vectors in enumerate(documents)}
    np.savez(args.out, settings=json.dumps(settings, default=str), **arrays)


if __name__ == "__main__":
    main()
