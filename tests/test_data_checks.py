"""What data a model can read: token lengths and image shapes from its embeddings, and splits saved without rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build
from datasets import Dataset, DatasetDict

from hf_otfusion import FusionConfig, fuse
from hf_otfusion.checkpoints import weightless_model
from hf_otfusion.data_checks import check_model_inputs, empty_saved_splits, input_limits
from hf_otfusion.errors import DataSourceError, EmptyAlignmentDataError, TargetShapeError
from hf_otfusion.methods.target import check_target

FIXES = dict(fix_length="pass --max-length {n} or less", fix_images="resize to {c}x{h}x{w}")


def meta(model):
    return weightless_model(type(model), model.config)


@pytest.mark.parametrize(
    ("family", "tokens", "offset"), [("bert-seqcls", 24, 0), ("roberta-seqcls", 22, 2), ("roberta-base", 22, 2)]
)
def test_the_longest_sequence_comes_from_the_position_table_less_roberta_s_padding_offset(family, tokens, offset):
    for model in (build(family), meta(build(family))):  # the pre-flight reads a weightless skeleton
        limits = input_limits(model)
        assert (limits.max_tokens, limits.max_positions, limits.position_offset, limits.image_shape) == (
            tokens, 24, offset, None,
        )  # fmt: skip


def test_sequences_one_token_too_long_are_refused_naming_both_lengths_and_the_fix():
    model = meta(build("roberta-seqcls"))
    check_model_inputs({"input_ids": torch.ones(22, dtype=torch.long)}, model, source="--data d", **FIXES)
    with pytest.raises(DataSourceError) as caught:
        check_model_inputs({"input_ids": torch.ones(23, dtype=torch.long)}, model, source="--data d", **FIXES)
    assert str(caught.value) == (
        "--data d reaches the model as sequences of 23 tokens, but RobertaForSequenceClassification takes at most "
        "22 (max_position_embeddings=24 less the 2 positions numbered before the first token); pass --max-length "
        "22 or less."
    )
    assert caught.value.source == "--data d"


@pytest.mark.parametrize("family", ["vit-cls", "deit-teacher", "vit-base"])
def test_images_of_another_size_or_channel_count_are_refused_naming_both_shapes(family):
    model = meta(build(family))
    assert input_limits(model).image_shape == (1, 8, 8) and input_limits(model).max_tokens is None
    check_model_inputs({"pixel_values": torch.zeros(1, 8, 8)}, model, source="--data d", **FIXES)
    for shape in ((3, 8, 8), (1, 16, 16), (1, 8, 12)):
        with pytest.raises(DataSourceError, match=r"^--data d reaches the model as \d-channel \d+x\d+ images") as e:
            check_model_inputs({"pixel_values": torch.zeros(shape)}, model, source="--data d", **FIXES)
        assert f"{shape[0]}-channel {shape[1]}x{shape[2]} images, but " in str(e.value)
        assert str(e.value).endswith("1-channel 8x8 images (config num_channels=1, image_size=8); resize to 1x8x8.")


def test_splits_saved_without_rows_are_found_from_the_saved_state(tmp_path):
    rows = {"x": np.arange(3)}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "full")
    Dataset.from_dict({"x": np.arange(0)}).save_to_disk(tmp_path / "empty")
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict({"x": []})}).save_to_disk(tmp_path / "dd")
    assert empty_saved_splits(tmp_path / "full") == []
    assert empty_saved_splits(tmp_path / "empty") == [None]
    assert empty_saved_splits(tmp_path / "dd") == ["test"]


@pytest.mark.parametrize(
    ("family", "target", "message"),
    [
        ("vit-cls", {"hidden_size": 64}, "The target has 64 units in space 'residual' where the anchor has 32"),
        ("vit-cls", {"intermediate_size": 96}, "The target has 96 units in space 'mlp.0' where the anchor has 48"),
        ("vit-cls", {"num_attention_heads": 2}, "The target has heads of 16 dims in space 'qk.0' where the anchor"),
        ("vit-cls", {"hidden_size": 30}, "The target {'hidden_size': 30} does not give a valid model: Space qk.0"),
        ("bert-seqcls", {"hidden_size": 30}, "The target {'hidden_size': 30} does not give a valid Bert"),
    ],
)
def test_a_bad_target_is_refused_on_the_weightless_anchor_as_fuse_refuses_it(family, target, message):
    parent = build(family)
    with pytest.raises(TargetShapeError) as on_skeleton:
        check_target(meta(parent), target)
    assert str(on_skeleton.value).startswith(message)
    with pytest.raises(TargetShapeError) as in_fuse:
        fuse([parent, build(family, seed=1)], config=FusionConfig(cost="weights", target=target), progress=False)
    assert str(in_fuse.value) == str(on_skeleton.value)
    check_target(meta(parent), {"hidden_size": 16, "intermediate_size": 24})  # a real compression passes


def test_an_anchor_saved_without_pooler_compresses_into_a_target_without_pooler():
    """The basis is built with the anchor's optional submodules (`add_pooling_layer=False`), in pre-flight and fuse."""
    import transformers as T
    from conftest import TEXT, randomise

    parents = [randomise(T.BertModel(T.BertConfig(**TEXT), add_pooling_layer=False), seed) for seed in (0, 1)]
    check_target(parents[0], {"hidden_size": 16})  # raised KeyError: pooler before
    fused = fuse(parents, config=FusionConfig(cost="weights", target={"hidden_size": 16}), progress=False)
    assert fused.pooler is None and fused.config.hidden_size == 16
    assert fused.embeddings.word_embeddings.weight.shape == (60, 16)


def test_the_python_api_refuses_data_the_anchor_cannot_read_before_any_pass():
    model = build("vit-cls")
    size, channels = model.config.image_size, model.config.num_channels
    wrong = Dataset.from_dict({"pixel_values": np.zeros((4, channels, size + 2, size + 2), dtype=np.float32)})
    with pytest.raises(DataSourceError, match=rf"{size + 2}x{size + 2} images, but ViTForImageClassification takes"):
        fuse([model, model], data=wrong, progress=False)
    with pytest.raises(EmptyAlignmentDataError, match="holds no rows"):
        fuse([model, model], data=wrong.select([]), progress=False)
    bert = build("bert-seqcls")
    too_long = bert.config.max_position_embeddings + 1
    tokens = Dataset.from_dict({"input_ids": np.ones((2, too_long), dtype=np.int64)})
    with pytest.raises(DataSourceError, match=rf"sequences of {too_long} tokens.*truncate its input_ids"):
        fuse([bert, bert], data=tokens, progress=False)
