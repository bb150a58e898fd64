"""Checkpoints are loaded one at a time: fusing N of them holds two models, and gives the in-memory result."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import build, inputs_for

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics, permute_model
from hf_otfusion import fusion as fusion_module
from hf_otfusion.engine import align
from hf_otfusion.errors import NonFiniteWeightsError


def _tracked(model, loaded: list):
    loaded.append(weakref.ref(model))
    return model


@pytest.fixture
def checkpoints(tmp_path):
    parents = [build("vit-cls", seed=0), permute_model(build("vit-cls", seed=0), seed=1), build("vit-cls", seed=2)]
    paths = []
    for k, parent in enumerate(parents):
        parent.save_pretrained(tmp_path / str(k))
        paths.append(str(tmp_path / str(k)))
    return parents, paths


def test_two_checkpoints_fuse_to_exactly_the_weights_of_two_loaded_models(checkpoints):
    parents, paths = checkpoints
    config = FusionConfig(cost="activations", solver="sinkhorn", reg=0.1, anchor=1)  # the anchor is overwritten
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    from_memory = fuse(parents[1:], data=data, config=config, progress=False)
    from_disk = fuse(paths[1:], data=data, config=config, progress=False)
    for (name, a), (_, b) in zip(from_memory.named_parameters(), from_disk.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_three_checkpoints_fuse_holding_at_most_two_models(checkpoints, monkeypatch):
    parents, paths = checkpoints
    config = FusionConfig(cost="activations", weights=[1.0, 2.0, 5.0])
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    from_memory = fuse(parents, data=data, config=config, progress=False)

    loaded = []  # a weak reference to every checkpoint fuse loads
    load_parent = fusion_module.load_parent
    monkeypatch.setattr(fusion_module, "load_parent", lambda path: _tracked(load_parent(path), loaded))

    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in loaded)

    peaks = {"statistics": 0, "average": 0}
    for stage, function in (("statistics", "collect_statistics"), ("average", "average_into")):
        original = getattr(fusion_module, function)

        def counted(*args, _stage=stage, _original=original, **kwargs):
            peaks[_stage] = max(peaks[_stage], alive())
            return _original(*args, **kwargs)

        monkeypatch.setattr(fusion_module, function, counted)
    from_disk = fuse(paths, data=data, config=config, progress=False)
    assert len(loaded) == 5  # the anchor once, the two others twice: for their maps, then for the average
    assert peaks == {"statistics": 2, "average": 2}  # the anchor (the fused model-to-be) and one other parent
    assert alive() == 1 and loaded[0]() is from_disk  # the fused model is the loaded anchor, overwritten: no copy
    # the three-way sum is rounded to float32 between parents here, once when all are in memory
    for (name, a), (_, b) in zip(from_memory.named_parameters(), from_disk.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_a_checkpoint_with_nan_is_named_when_it_is_loaded(checkpoints, tmp_path):
    parents, paths = checkpoints
    broken = build("vit-cls", seed=3)
    with torch.no_grad():
        broken.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(NonFiniteWeightsError, match="Parent 2 has NaN.*layers.1.mlp.fc1.weight"):
        fuse_with_diagnostics([paths[0], paths[1], str(tmp_path / "broken")], config=FusionConfig(cost="weights"),
                              progress=False)  # fmt: skip


def test_tensors_mixed_in_pieces_equal_tensors_mixed_whole(monkeypatch):
    parents = [build("bert-mlm", seed=0), build("bert-mlm", seed=1)]
    config = FusionConfig(cost="weights", solver="sinkhorn", reg=0.1)  # dense maps: a matrix product per piece
    whole = fuse(parents, config=config, progress=False)
    monkeypatch.setattr(align, "PIECE_ELEMENTS", 100)  # the embeddings (60 x 32) go in 3-row pieces
    pieces = align.pieces(torch.Size([60, 32]), (None, object()))
    assert len(pieces) == 20 and pieces[-1] == (slice(57, 60),)
    pieced = fuse(parents, config=config, progress=False)
    for (name, a), (_, b) in zip(whole.named_parameters(), pieced.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert pieced.cls.predictions.decoder.weight is pieced.bert.embeddings.word_embeddings.weight


def test_a_checkpoint_missing_a_weight_is_refused_not_randomly_filled(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_otfusion.errors import CorruptCheckpointError

    _, paths = checkpoints
    weights = load_file(f"{paths[1]}/model.safetensors")
    del weights[next(name for name in sorted(weights) if name.endswith("bias") and ".0." in name)]
    save_file(weights, f"{paths[1]}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=r"Parent .*1 does not hold the weights.*missing_keys"):
        fuse(paths[:2], config=FusionConfig(cost="weights"), progress=False)
