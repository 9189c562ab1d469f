"""PyLate's arm of `bench/pylate_check.py`: load a ColBERT-X folder with PyLate and encode the texts.

Run by the python of the venv that `common.peer_python` makes for `common.PEERS["pylate"]` (PyLate 1.6 pins its own
transformers), so it imports nothing from td-ray:

    $PY bench/pylate_arm.py --model DIR --texts TEXTS.json --out OUT.npz

TEXTS.json holds {"queries": [...], "documents": [...]}; OUT.npz gets `query_<i>` and `document_<i>` arrays (one
vector per token PyLate keeps) and `settings`, a JSON string of what PyLate read from the folder (`common.peer_arm`).
"""
from __future__ import annotations

from importlib import metadata

from common import peer_arm


def encode(folder: str, queries: list[str], documents: list[str]):
    from pylate import models

    model = models.ColBERT(model_name_or_path=folder, device="cpu")
    settings = {name: getattr(model, name, None) for name in (
        "query_prefix", "document_prefix", "query_length", "document_length", "attend_to_expansion_tokens",
        "do_query_expansion")}
    settings["skiplist_words"] = len(getattr(model, "skiplist_words", None) or [])
    settings["versions"] = {name: metadata.version(name) for name in ("pylate", "sentence-transformers",
                                                                      "transformers", "torch")}
    settings["modules"] = [type(module).__name__ for module in model]
    return (model.encode(queries, is_query=True, convert_to_numpy=True),
            model.encode(documents, is_query=False, convert_to_numpy=True), settings)


if __name__ == "__main__":
    peer_arm(__doc__, encode)
