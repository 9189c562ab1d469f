"""PLAID-X's arm of `bench/pylate_check.py --peer plaid-x`: load a ColBERT-X folder with PLAID-X's `Checkpoint` and
encode the texts, on CPU.

Run by the python of the venv that `common.peer_python` makes for `common.PEERS["plaid-x"]` (PLAID-X 0.3.3 needs
Python 3.10 and transformers 4), so it imports nothing from td-ray:

    $PY bench/plaidx_arm.py --model DIR --texts TEXTS.json --out OUT.npz

The same files as `bench/pylate_arm.py` (`common.peer_arm`): the token vectors PLAID-X keeps, and the ColBERT config
it read from the folder.
"""
from __future__ import annotations

from importlib import metadata

from common import peer_arm


def encode(folder: str, queries: list[str], documents: list[str]):
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint

    # an empty config: the folder's artifact.metadata decides every setting (PLAID-X needs the object, not None)
    checkpoint = Checkpoint(folder, colbert_config=ColBERTConfig()).eval()
    config = checkpoint.colbert_config
    settings = {name: getattr(config, name, None) for name in (
        "dim", "query_maxlen", "doc_maxlen", "query_token_id", "doc_token_id", "mask_punctuation",
        "attend_to_mask_tokens", "similarity", "model_name")}
    settings["versions"] = {name: metadata.version(name) for name in ("PLAID-X", "transformers", "torch")}
    query_vectors = checkpoint.queryFromText(queries, to_cpu=True).float()
    # one document at a time: keep_dims=False with to_cpu fails in PLAID-X 0.3.3; the tensors are on the CPU already
    document_vectors = [checkpoint.docFromText([text], keep_dims=False)[0].float() for text in documents]
    return list(query_vectors), document_vectors, settings


if __name__ == "__main__":
    peer_arm(__doc__, encode)
