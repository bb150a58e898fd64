"""The README's first command: the shipped digits parents fused by `examples/fuse_digits.py`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert len(rows) == 9, proc.stdout
    parents = [float(rows[f"parent {k} (seed {k})"]) for k in (0, 1)]
    vanilla = float(rows["vanilla average"])
    assert min(parents) > 0.9  # the shipped parents are trained, not random
    assert float(rows["OT permutations only"]) > vanilla  # alignment beats plain averaging one-shot
    assert float(rows["OT rotations (default)"]) > float(rows["OT permutations only"]) + 0.2  # rotations matter
    assert float(rows["OT rotations + refine 200"]) > 0.85  # close to the parents one-shot
    closed_form = float(rows["OT closed form (no training)"])
    assert closed_form > float(rows["OT rotations (default)"]) + 0.1  # RegMean keeps what the average loses
    assert closed_form > 0.9  # refitted on the fused model's own inputs, it keeps most of the parents' accuracy
    finetuned = next(float(v) for name, v in rows.items() if "finetuned" in name)
    assert finetuned > min(parents) - 0.03
    classify = T.pipeline("image-classification", model=str(tmp_path / "fused-digits"))  # model and processor load
    # the pipeline's own call converts every image to RGB, which a 1-channel model cannot read: run its parts
    digit = np.zeros((8, 8, 1), dtype=np.uint8)
    pixels = classify.image_processor(images=digit, return_tensors="pt", input_data_format="channels_last")
    assert classify.model(**pixels).logits.shape == (1, 10)
