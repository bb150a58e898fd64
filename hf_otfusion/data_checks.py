"""Checks that data can reach a model: it has rows, and its encoded inputs have the shapes the model takes.

A ViT built for 224-pixel RGB images raises deep inside its first forward pass when given 32-pixel greyscale
ones, and a BERT with 512 positions indexes past its position table when the tokenizer pads to 1024. In a
fusion job that pass is the statistics pass, after every parent was downloaded. These checks compare one
encoded example with what the model's config and embeddings accept, so the job can refuse the data during
pre-flight, naming both sizes and the option that fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataSourceError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class InputLimits:
    """What a model's embeddings accept.

    Attributes:
        max_tokens: the longest token sequence (`None` for models that read no tokens).
        max_positions: the model's `max_position_embeddings`.
        position_offset: the positions reserved before the first token's (RoBERTa numbers positions from
            `padding_idx + 1`, so 2 of its 514 positions are never a token's); `max_tokens` has them taken off.
        image_shape: `(channels, height, width)` of the images it reads (`None` for text models).
    """

    max_tokens: int | None = None
    max_positions: int | None = None
    position_offset: int = 0
    image_shape: tuple[int, int, int] | None = None


def input_limits(model: PreTrainedModel) -> InputLimits:
    """The token length and image shape `model` accepts, from its config and its position embeddings.

    Works on a weightless (meta-device) model: only module attributes are read. The offset comes from the
    position table itself (an `nn.Embedding` with a `padding_idx`, as RoBERTa-style models build it), not from
    a list of model types, so every architecture that numbers positions after the padding index is covered.
    """
    from torch import nn

    config = model.config
    limits: dict[str, Any] = {}
    tables = [
        module
        for name, module in model.named_modules()
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding)
    ]
    if tables:
        offsets = [0 if table.padding_idx is None else table.padding_idx + 1 for table in tables]
        positions = min(table.num_embeddings for table in tables)
        limits.update(max_positions=positions, position_offset=max(offsets), max_tokens=positions - max(offsets))
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if size is not None and channels is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        limits["image_shape"] = (int(channels), int(height), int(width))
    return InputLimits(**limits)


#: the fixes `check_model_inputs` names for data that holds model inputs already (the CLI's and the Python API's)
FIXES_FOR_GIVEN_INPUTS = dict(
    fix_length="truncate its input_ids to {n} tokens or fewer",
    fix_images="give pixel_values of shape ({c}, {h}, {w}), or raw images with an image processor saved next to the "
    "anchor (preprocessor_config.json) that resizes them",
)


def check_model_inputs(
    example: Mapping[str, Any], model: PreTrainedModel, *, source: str, fix_length: str, fix_images: str
) -> None:
    """Raises `DataSourceError` when an encoded example does not fit `model`'s embeddings.

    Args:
        example: one encoded row (`input_ids` of shape `(length,)`, `pixel_values` of shape `(C, H, W)`), as
            `data.encode_dataset` gives it; text rows are padded to one length, so one row speaks for all.
        model: the model that will read the data (a meta-device skeleton is enough).
        source: how the data is named in the message (`"--data ./align"`).
        fix_length: what shortens the sequences, for the message (`"pass --max-length {n} or less"`); `{n}`
            is replaced by the longest length the model takes.
        fix_images: what gives images of the right shape; `{c}`, `{h}`, `{w}` are replaced by the model's
            channels, height and width.

    Raises:
        DataSourceError: sequences longer than the position table allows, or images of another size or
            number of channels than the config's `image_size` / `num_channels`; both sizes are named.
    """
    limits, name = input_limits(model), model.__class__.__name__
    if "input_ids" in example and limits.max_tokens is not None:
        length = int(example["input_ids"].shape[-1])
        if length > limits.max_tokens:
            offset = (
                f" less the {limits.position_offset} positions numbered before the first token"
                if limits.position_offset
                else ""
            )
            raise DataSourceError(
                f"{source} reaches the model as sequences of {length} tokens, but {name} takes at most "
                f"{limits.max_tokens} (max_position_embeddings={limits.max_positions}{offset}); "
                f"{fix_length.format(n=limits.max_tokens)}.",
                source=source,
            )
    if "pixel_values" in example and limits.image_shape is not None:
        shape = tuple(int(v) for v in example["pixel_values"].shape[-3:])
        if shape != limits.image_shape:
            (c, h, w), (mc, mh, mw) = shape, limits.image_shape
            raise DataSourceError(
                f"{source} reaches the model as {c}-channel {h}x{w} images, but {name} takes {mc}-channel {mh}x{mw} "
                f"images (config num_channels={mc}, image_size={mh if mh == mw else [mh, mw]}); "
                f"{fix_images.format(c=mc, h=mh, w=mw)}.",
                source=source,
            )


def empty_saved_splits(path: str | Path) -> list[str | None]:
    """The splits of a `save_to_disk` directory saved with no rows (`None` for a single saved Dataset).

    `datasets` writes no data file for an empty split and then cannot load it back (an `IndexError` inside
    `load_from_disk`), so the emptiness is read from the saved state instead.
    """
    path = Path(path)
    states = {None: path / "state.json"}
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        states = {split: path / split / "state.json" for split in splits}
    empty: list[str | None] = []
    for split, state in states.items():
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError):
            continue  # not a saved split: `load_from_disk` says what is wrong
        if files == []:
            empty.append(split)
    return empty


def no_rows_error(source: str, split: str | None) -> DataSourceError:
    """The error for data that has no rows in the split used (before or after the sample cap)."""
    where = f"split {split!r}" if split is not None else "the saved Dataset"
    return DataSourceError(
        f"Data source {source!r} has no rows in {where}; give data with at least one example (check the files, "
        "the filter that wrote them, and --split / --eval-split).",
        source=source,
    )
