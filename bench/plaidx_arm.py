"""PLAID-X's arm of `bench/pylate_check.py --peer plaid-x`: load a ColBERT-X folder with PLAID-X's `Checkpoint` and
encode the texts, on CPU.

Run by the python of the venv that `common.peer_python` makes for `common.PLAID_X` (PLAID-X 0.3.3 pins faiss-cpu
1.9.0), so it imports nothing from td-ray:

    $PY bench/plaidx_arm.py --model DIR --texts TEXTS.json --out OUT.npz

The same files as `bench/pylate_arm.py`: OUT.npz gets `query_<i>` and `document_<i>` (the token vectors PLAID-X keeps)
and `settings`, a JSON string of the ColBERT config PLAID-X read from the folder.
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
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    texts = json.loads(open(args.texts, encoding="utf-8").read())
    # an empty config: the folder's artifact.metadata decides every setting (PLAID-X needs the object, not None)
    checkpoint = Checkpoint(args.model, colbert_config=ColBERTConfig()).eval()
    queries = checkpoint.queryFromText(texts["queries"], to_cpu=True)
    documents = [checkpoint.docFromText([text], keep_dims=False)[0] for text in texts["documents"]]  # on the CPU already
    config = checkpoint.colbert_config
    settings = {name: getattr(config, name, None) for name in (
        "dim", "query_maxlen", "doc_maxlen", "query_token_id", "doc_token_id", "mask_punctuation",
        "attend_to_mask_tokens", "similarity")}
    settings["versions"] = {name: metadata.version(name) for name in ("PLAID-X", "transformers", "torch")}
    arrays = {f"query_{i}": np.asarray(vectors.float(), np.float32) for i, vectors in enumerate(queries)}
    arrays |= {f"document_{i}": np.asarray(vectors.float(), np.float32) for i, vectors in enumerate(documents)}
    np.savez(args.out, settings=json.dumps(settings, default=str), **arrays)


if __name__ == "__main__":
    main()
