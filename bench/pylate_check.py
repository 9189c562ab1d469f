"""Do PyLate and PLAID-X load td-ray's ColBERT-X student and give td-ray's vectors?

td-ray saves ColBERT-X students in PLAID-X's HF_ColBERT layout (`td_ray/encoders/colbert.py`). PyLate 1.6 pins
transformers<=5.3 and sentence-transformers 5.3, and PLAID-X 0.3.3 pins faiss-cpu 1.9.0, so each runs in a venv of its
own (`common.peer_python`, about 5 GB the first time). This script saves a ColBERT-X student built on the tiny BERT,
encodes the same queries and documents with td-ray here and with the peer there (`bench/pylate_arm.py`,
`bench/plaidx_arm.py`), and writes `bench/results/<peer>_check.json`: what the peer read from the folder, the token
counts each side keeps, and the cosine of each token vector the peer gives with td-ray's.

    .venv/bin/python bench/pylate_check.py [--peer pylate|plaid-x]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import PEERS, RESULTS, machine_info, peer_python, write_report

logger = logging.getLogger("bench.pylate_check")
HERE = Path(__file__).resolve().parent
QUERIES = ["kodona rumut vikel", "zilok tumi bosek gume"]
DOCUMENTS = ["zilok tumi bosek vikel gume kodona", "rumut kodona zilok", "vikel gume tumi rumut bosek zilok kodona"]


def cosines(ours: np.ndarray, theirs: np.ndarray) -> list[float]:
    """Cosine of each row of `ours` with the same row of `theirs` (the rows both have)."""
    rows = min(len(ours), len(theirs))
    a, b = ours[:rows], theirs[:rows]
    return ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).tolist()


def main(argv: list[str] | None = None) -> int:
    import torch

    from td_ray.assets.tiny_models import build_tiny_base
    from td_ray.encoders.colbert import ColBERTStudentEncoder, load_colbert
    from td_ray.encoders.spec import ColBERTSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/td-ray-pylate-check"))
    parser.add_argument("--peer", choices=sorted(PEERS), default="pylate")
    parser.add_argument("--out", type=Path, help="default: bench/results/<peer>_check.json")
    args = parser.parse_args(argv)
    requirements, module, arm, interpreter = PEERS[args.peer]
    args.out = args.out or RESULTS / f"{args.peer.replace('-', '')}_check.json"
    shutil.rmtree(args.work, ignore_errors=True)
    student = build_tiny_base(args.work / "tiny-models").student
    torch.manual_seed(0)
    model, tokenizer = load_colbert(student, ColBERTSpec(dim=32, query_maxlen=16, doc_maxlen=64))
    folder = args.work / "colbert"
    model.save_pretrained(folder, tokenizer)
    encoder = ColBERTStudentEncoder(folder)
    ours = {"queries": list(encoder.encode_queries(QUERIES)), "documents": encoder.encode_documents(DOCUMENTS)}

    texts = args.work / "texts.json"
    texts.write_text(json.dumps({"queries": QUERIES, "documents": DOCUMENTS}))
    python = peer_python(requirements, module, interpreter)
    out = args.work / "peer.npz"
    done = subprocess.run([python, HERE / arm, "--model", folder, "--texts", texts, "--out", out],
                          capture_output=True, text=True, check=False)
    report = {"machine": machine_info(), "peer": requirements, "folder_files": sorted(p.name for p in folder.iterdir()),
              "loaded": done.returncode == 0}
    if done.returncode != 0:
        report["error"] = done.stderr[-4000:]
    else:
        theirs = np.load(out)
        report["peer_settings"] = json.loads(str(theirs["settings"]))
        for kind, count in (("query", len(QUERIES)), ("document", len(DOCUMENTS))):
            side = ours["queries" if kind == "query" else "documents"]
            rows = []
            for i in range(count):
                mine, peer = side[i], theirs[f"{kind}_{i}"]
                row = {"td_ray_shape": list(mine.shape), "peer_shape": list(peer.shape)}
                if mine.shape[1] == peer.shape[1]:
                    values = cosines(mine, peer)
                    row |= {"min_cosine": round(min(values), 6), "mean_cosine": round(float(np.mean(values)), 6)}
                rows.append(row)
            report[f"{kind}_vectors"] = rows
        report["same_vectors"] = all(row["td_ray_shape"] == row["peer_shape"] and row.get("min_cosine", 0) > 1 - 1e-5
                                     for kind in ("query", "document") for row in report[f"{kind}_vectors"])
    write_report(report, args.out)
    print(json.dumps({key: report.get(key) for key in ("loaded", "same_vectors", "query_vectors", "document_vectors")},
                     indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
