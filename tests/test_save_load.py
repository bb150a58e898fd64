"""The fused model is a normal checkpoint: safetensors on disk, loaded back by the Auto classes unchanged."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import build, inputs_for, outputs

from hf_otfusion import FusionConfig, fuse

AUTO = {
    "bert-seqcls": T.AutoModelForSequenceClassification,
    "bert-mlm": T.AutoModelForMaskedLM,
    "vit-cls": T.AutoModelForImageClassification,
    "deit-teacher": T.AutoModel,  # resolves through config.architectures below
}


@pytest.mark.parametrize("family", list(AUTO))
def test_fused_model_round_trips_through_save_pretrained(family, tmp_path):
    parents = [build(family, seed=0), build(family, seed=1)]
    fused = fuse(parents, config=FusionConfig(cost="weights"), progress=False)
    assert type(fused) is type(parents[0])
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    if family == "deit-teacher":
        loaded = T.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path)
    else:
        loaded = AUTO[family].from_pretrained(tmp_path)
    assert type(loaded) is type(fused)
    inputs = inputs_for(fused)
    torch.testing.assert_close(outputs(loaded.eval(), inputs), outputs(fused, inputs), rtol=0, atol=0)
