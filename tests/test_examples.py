"""The README's first command: the shipped digits parents fused by `examples/fuse_digits.py`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import transformers as T

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_readme_first_command_fuses_the_shipped_parents_and_reports_accuracy(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "fuse_digits.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = dict(re.findall(r"^(parent \d \(seed \d\)|vanilla average|OT [^\n]*?)\s+(\d\.\d{3})", proc.stdout, re.M))
    assert len(rows) == 6, proc.stdout
    parents = [float(rows[f"parent {k} (seed {k})"]) for k in (0, 1)]
    vanilla = float(rows["vanilla average"])
    best_ot = max(float(v) for name, v in rows.items() if name.startswith("OT"))
    assert min(parents) > 0.9  # the shipped parents are trained, not random
    assert best_ot > vanilla + 0.1  # alignment beats plain averaging one-shot
    fused = T.AutoModelForImageClassification.from_pretrained(tmp_path / "fused-digits")
    assert fused.config.num_labels == 10
