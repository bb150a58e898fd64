"""mergekit on the outputs of `otfusion-hub align`: the recipe the aligned cards print, run as a user runs it.

mergekit is an optional extra (`pip install hf-otfusion[mergekit]`), never a runtime dependency, so this file is
skipped where it is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import build

from hf_otfusion import FusionConfig, fuse
from hf_otfusion.cli import main

pytest.importorskip("mergekit")

#: max |mergekit linear merge - fuse(method="ot")| per tensor: both are the float32 mean of the same aligned tensors
TOLERANCE = 1e-6


def card_recipe(card: Path) -> str:
    """The mergekit config an aligned checkpoint's card prints under "Merging with mergekit"."""
    section = card.read_text().split("## Merging with mergekit", 1)[1]
    found = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert found, "the aligned card shows no mergekit config"
    return found.group(1)


def test_mergekit_linear_on_aligned_parents_is_the_ot_fusion(tmp_path):
    parents = []
    for k, name in enumerate(("model-a", "model-b")):
        build("bert-seqcls", k).save_pretrained(tmp_path / name)
        parents.append(str(tmp_path / name))
    aligned = tmp_path / "aligned"
    assert main(["align", *parents, "--out", str(aligned), "--cost", "weights", "-q"]) == 0
    recipe = card_recipe(aligned / "model-a" / "README.md")
    assert "merge_method: linear" in recipe and "model: model-b" in recipe
    (aligned / "config.yml").write_text(recipe)
    # the command the card prints, from the directory that holds the aligned checkpoints; without mergekit's own
    # card, whose writer asks the Hub whether each relative model path is a repository (which fails offline)
    command = [str(Path(sys.executable).with_name("mergekit-yaml")), "config.yml", "merged/", "--no-write-model-card"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=aligned, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    merged = T.AutoModelForSequenceClassification.from_pretrained(aligned / "merged").eval()
    fused = fuse(parents, config=FusionConfig(cost="weights"), progress=False)
    expected, got = dict(fused.named_parameters()), dict(merged.named_parameters())
    assert got.keys() == expected.keys()
    worst = max((got[name].double() - tensor.double()).abs().max().item() for name, tensor in expected.items())
    print(f"mergekit linear vs fuse(method='ot'): max |difference| {worst:.3g}")
    assert worst <= TOLERANCE
    # and the merge is not one of the parents: the aligned parents differ, so their mean moved
    second = T.AutoModelForSequenceClassification.from_pretrained(aligned / "model-b")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.allclose(got[name], second.get_parameter(name), atol=1e-3)
