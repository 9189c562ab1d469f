"""bench/gpu_smoke.py, the one-H100 check of the GPU paths, at its CPU size: every step runs, and the device's results
are checked against the CPU's inside it (on a CPU they are the same device, so they must agree exactly)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_smoke_script_runs_every_step_at_its_cpu_size(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--small", "--out", str(out)], check=True,
                   cwd=ROOT, timeout=300)
    report = json.loads(out.read_text())
    index = report["token_index"]
    assert report["device"] == "cpu" and index["codec_train"]["centroids"] == 256
    assert index["compress"]["ids_equal_cpu"] == 1.0 and index["compress"]["codes_equal_cpu"] == 1.0
    assert index["search"]["top10_equal_cpu"] == 1.0 and index["search"]["ms_per_query"] > 0
    for student in ("colbert", "dense"):
        assert report["encoders"][student]["cosine_bf16_fp32"] > 0.999  # no autocast on a CPU: fp32 both times
        assert report["encoders"][student]["top10_overlap"] == 1.0
    assert "skipped" in report["faiss"]  # faiss-cpu has no GPU
