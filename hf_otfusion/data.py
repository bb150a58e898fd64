"""Alignment and evaluation data: find a data set (Hub or local), pin it, sample it, and encode it for a model.

The same code path serves a user's Hub data set (`user/name@rev`, loaded with `datasets.load_dataset` pinned to
the resolved commit), a directory written by `save_to_disk`, a local data directory (imagefolder, csv, ...) and
local data files. `DataSource` records where the rows came from (id, revision, commit, split, sample count,
seed), which is what a model card needs to let someone rebuild the exact alignment set.
"""

from __future__ import annotations

import glob
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data_checks import empty_saved_splits, no_rows_error
from .errors import DataSourceError, LabelSetMismatchError, MissingDependencyError, UnknownRevisionError

logger = logging.getLogger(__name__)

#: Columns that already are model inputs: a data set holding one of them is passed through by `encode_dataset`.
MODEL_INPUT_COLUMNS = ("input_ids", "pixel_values")
#: Columns a tokenizer produces that BERT-like models accept.
TEXT_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
#: Names tried, in order, when no text / image / label column is given.
TEXT_COLUMN_NAMES = ("text", "sentence", "content", "document", "review", "question")
IMAGE_COLUMN_NAMES = ("image", "img", "picture")
LABEL_COLUMN_NAMES = ("labels", "label", "target", "class")

_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


def pinned_source(kind: str | None, repo_id: str | None, commit: str | None, source: str) -> str:
    """`repo@commit` for a Hub data source, the path as given for a local one (also from a provenance record)."""
    return f"{repo_id}@{commit}" if kind == "hub" else source


@dataclass
class DataSource:
    """Where a data set comes from, resolved far enough to be reloaded exactly.

    Attributes:
        source: the string the user gave (`user/name@rev`, a directory or a file pattern).
        kind: `hub` (a Hub dataset repo), `disk` (a `save_to_disk` directory) or `local` (data files or a data
            directory read by a `datasets` builder such as imagefolder or csv).
        repo_id / revision / commit: for `hub`: the repository, the requested revision and its commit SHA.
        split: the split used; filled in by `choose_split()` (or `load()`) when none was asked for.
        default_split: the split taken when none was asked for and the source has several (`train` for
            alignment and training data, `test` for evaluation); a source with one split always gives that one.
            Not recorded by `to_dict`: `split` holds the one used.
        num_samples: the requested cap on rows (`None` = all); `seed` shuffles before the cap is applied.
        num_rows: rows actually used, filled in by `load()`.
        fingerprint: the `datasets` fingerprint of the rows used, filled in by `load()`.
    """

    source: str
    kind: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    split: str | None = None
    num_samples: int | None = None
    seed: int = 0
    num_rows: int | None = None
    fingerprint: str | None = None
    default_split: str = "train"

    @classmethod
    def resolve(
        cls,
        source: str,
        split: str | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        default_split: str = "train",
    ) -> DataSource:
        """Finds `source` locally or on the Hub and pins a Hub revision to its commit SHA (no data is downloaded).

        Raises:
            DataSourceError: the source is neither an existing local path nor a Hub dataset repository.
            UnknownRevisionError: the `@revision` of a Hub data set does not exist.
        """
        if num_samples is not None and num_samples < 1:
            raise DataSourceError(f"num_samples must be >= 1 or None, got {num_samples}.", source=source)
        path = Path(source).expanduser()
        common = dict(split=split, num_samples=num_samples, seed=seed, default_split=default_split)
        if path.is_dir():
            kind = "disk" if _is_saved_dataset(path) else "local"
            return cls(source=str(path), kind=kind, **common)
        if path.is_file() or glob.glob(str(path)):
            return cls(source=str(path), kind="local", **common)
        repo_id, _, revision = source.partition("@")
        if not is_repo_id(repo_id):
            raise DataSourceError(
                f"Data source {source!r} is neither an existing local path nor a Hub dataset id (`user/name` "
                "or `user/name@revision`); check the path, or give the data set's Hub id.",
                source=source,
            )
        commit = _resolve_hub_dataset(repo_id, revision or None, source)
        return cls(source=source, kind="hub", repo_id=repo_id, revision=revision or None, commit=commit, **common)

    def load(self):
        """The rows of this source as a `datasets.Dataset`: the split, then a seeded shuffle and cap if asked.

        Fills in `split`, `num_rows` and `fingerprint` on this record.
        """
        with self._read_errors() as datasets:
            dataset = self._load_split(datasets)
        if self.num_samples is not None and self.num_samples < len(dataset):
            dataset = dataset.shuffle(seed=self.seed).select(range(self.num_samples))
        if len(dataset) == 0:
            raise no_rows_error(self.source, self.split)
        self.num_rows = len(dataset)
        self.fingerprint = dataset._fingerprint
        logger.info("data %s: split %s, %d rows", self.source, self.split, self.num_rows)
        return dataset

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field but `default_split` (the `split` used says it all), for provenance files."""
        record = asdict(self)
        del record["default_split"]
        return record

    def choose_split(self) -> str | None:
        """The split `load()` will use (`None` for a saved single Dataset), from the split names alone: no rows
        are read. Fills in `split`; a split asked for that the source lacks fails here, before any fusion."""
        with self._read_errors() as datasets:
            if self.kind == "disk":
                empty = empty_saved_splits(self.source)  # `load_from_disk` fails on any of them
                if empty:
                    raise no_rows_error(self.source, empty[0])
                loaded = datasets.load_from_disk(self.source)
                if isinstance(loaded, datasets.DatasetDict):
                    self.split = _choose_split(list(loaded), self.split, self.source, self.default_split)
                elif self.split not in (None, "train"):
                    raise DataSourceError(
                        f"{self.source} holds a single Dataset, not a DatasetDict, so it has no split "
                        f"{self.split!r}; leave the split out.",
                        source=self.source,
                    )
            else:
                path, kwargs = self._builder()
                names = datasets.get_dataset_split_names(path, **kwargs)
                self.split = _choose_split(names, self.split, self.source, self.default_split, slices=True)
        return self.split

    @contextmanager
    def _read_errors(self):
        """Yields the `datasets` module; what it raises on a missing file, split or repo becomes `DataSourceError`."""
        import datasets

        try:
            yield datasets
        except DataSourceError:
            raise
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
            raise DataSourceError(f"Could not read data from {self.source!r}: {error}", source=self.source) from error

    def _builder(self) -> tuple[str, dict[str, Any]]:
        """What `datasets.load_dataset` is called with: a Hub repo at its commit, or a local builder and files."""
        if self.kind == "hub":
            return self.repo_id, {"revision": self.commit}
        return _local_builder(self.source)

    @property
    def pinned(self) -> str:
        """The source as a user would give it to rebuild the same rows: `repo@commit` for the Hub, else the path."""
        return pinned_source(self.kind, self.repo_id, self.commit, self.source)

    @property
    def hub_id(self) -> str | None:
        """The id to list under a model card's `datasets:` (Hub sources only; local paths mean nothing there)."""
        return self.repo_id if self.kind == "hub" else None

    def _load_split(self, datasets):
        self.choose_split()
        if self.kind == "disk":
            loaded = datasets.load_from_disk(self.source)
            return loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        path, kwargs = self._builder()
        try:
            return datasets.load_dataset(path, split=self.split, **kwargs)
        except ValueError as error:
            if "corresponds to no data" in str(error):  # datasets' words for a split without rows
                raise no_rows_error(self.source, self.split) from error
            if "split" in str(error).lower():
                names = datasets.get_dataset_split_names(path, **kwargs)
                raise DataSourceError(
                    f"{self.source} has no split {self.split!r}; available splits: {names}.", source=self.source
                ) from error
            raise


def load_dataset_source(source: str, split: str | None = None, num_samples: int | None = None, seed: int = 0):
    """A `datasets.Dataset` from a Hub id (`user/name[@rev]`), a `save_to_disk` dir, a data dir or data files.

    Args:
        source: where the data is; a local path wins over a Hub id of the same spelling.
        split: the split to use; `None` takes the only split, or `train` when there are several.
        num_samples: keep this many rows, chosen by a shuffle seeded with `seed` (`None` keeps all).
        seed: the shuffle seed, so that the same arguments give the same rows.

    Raises:
        DataSourceError, UnknownRevisionError: with a message that says what to fix.
    """
    return DataSource.resolve(source, split, num_samples, seed).load()


def encode_dataset(
    dataset,
    processor=None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    *,
    label2id: dict[str, int] | None = None,
):
    """Raw examples -> model inputs: token ids via a tokenizer, `pixel_values` via an image processor.

    Data that already holds model inputs (`input_ids` or `pixel_values`) passes through. Text is padded to
    `max_length`, so every batch stacks without a collator (padding never enters the statistics: the attention
    mask excludes it). A label column, when there is one, is kept as `labels`; with `label2id` (the model's),
    class names are mapped to the model's label ids so that accuracy compares like with like.

    Args:
        dataset: a `datasets.Dataset`.
        processor: the model's tokenizer or image processor (see `load_processor`).
        text_column / image_column / label_column: column names; detected from the column types and usual names
            when left out. `text_column` may name two columns separated by a comma (sentence pairs).
        max_length: tokenizer truncation and padding length.
        label2id: the model's `config.label2id`, to map class names of the data onto model label ids.

    Returns:
        A `datasets.Dataset` in torch format with the model input columns and, when labelled, `labels`.

    Raises:
        DataSourceError: a column cannot be found or guessed (the message lists the available columns).
        LabelSetMismatchError: the data's class names are not among the model's labels.
    """
    columns = list(dataset.column_names)
    label = _label_column(dataset, label_column)
    encoded = any(c in columns for c in MODEL_INPUT_COLUMNS) and text_column is None and image_column is None
    if encoded:
        keep = [c for c in columns if c in (*TEXT_INPUT_COLUMNS, "pixel_values")]
    else:
        if processor is None:
            raise DataSourceError(
                f"The data has no model input columns ({list(MODEL_INPUT_COLUMNS)}), only {columns}; pass the "
                "model's tokenizer or image processor so the raw text or images can be encoded."
            )
        if _is_tokenizer(processor):
            dataset = _tokenize(dataset, processor, _text_columns(dataset, text_column), max_length)
            keep = [c for c in TEXT_INPUT_COLUMNS if c in dataset.column_names]
        else:
            dataset = _process_images(dataset, processor, _image_column(dataset, image_column))
            keep = ["pixel_values"]
    if label is not None:
        dataset = _labels_as_model_ids(dataset, label, label2id)
        keep.append("labels")
    dataset = dataset.select_columns(keep)
    return dataset.with_format("torch")


def encode_with_anchor_processor(dataset, processor, missing: str, *, source: str | None = None, **options):
    """`encode_dataset` with the anchor's processor, whose error for raw rows without one says why (`missing`).

    `fuse` and the CLI both encode raw alignment rows with what was saved next to the anchor; when nothing was,
    the generic "pass the tokenizer" advice is wrong for them, so `missing` (why there is none, and the fix)
    is added to the message; `source` names the data in it.
    """
    try:
        return encode_dataset(dataset, processor, **options)
    except DataSourceError as error:
        if processor is not None:
            raise
        raise DataSourceError(f"{error} {missing}", source=source or error.source, column=error.column) from error


def load_processor(model_dir: str | Path, trust_remote_code: bool = False):
    """The tokenizer or image processor saved with a model (`AutoProcessor`), or `None` when there is none."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        # transformers reports a missing Pillow as "unrecognized processing class": say what is really missing
        if (Path(model_dir) / "preprocessor_config.json").is_file() and not _installed("PIL"):
            raise MissingDependencyError(
                f"{model_dir} has an image processor, which needs Pillow: pip install pillow (a dependency of "
                "hf-otfusion; this environment lacks it).",
                package="pillow",
                source=str(model_dir),
            ) from error
        logger.info("no processor in %s: %s", model_dir, error)
        return None


def _installed(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- sources
def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def is_repo_id(repo_id: str) -> bool:
    """Whether `repo_id` is a valid Hub repository id (`name` or `namespace/name`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _resolve_hub_dataset(repo_id: str, revision: str | None, source: str) -> str:
    """The commit SHA of a Hub dataset revision, asking only for the repo's metadata."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except RevisionNotFoundError as error:
        raise UnknownRevisionError(
            f"Data set {repo_id} has no revision {revision!r}; give an existing branch, tag or commit SHA after '@'.",
            source=repo_id,
            revision=revision,
        ) from error
    except RepositoryNotFoundError as error:
        raise DataSourceError(
            f"Data source {source!r} is not a local path, and the Hub has no dataset repository {repo_id!r} (or "
            "it is private: log in with `hf auth login` or set HF_TOKEN).",
            source=source,
        ) from error
    except OfflineModeIsEnabled as error:
        raise DataSourceError(
            f"Data source {source!r} is a Hub id but Hub access is disabled (HF_HUB_OFFLINE); unset it, or save the "
            "data set to disk and pass that directory.",
            source=source,
        ) from error


def _local_builder(source: str) -> tuple[str, dict[str, Any]]:
    """The `datasets.load_dataset` arguments for local files (by extension) or a data directory (inferred)."""
    path = Path(source)
    if path.is_dir():
        return str(path), {}
    files = sorted(glob.glob(source)) if not path.is_file() else [str(path)]
    builders = {_FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        raise DataSourceError(
            f"Cannot tell how to read {source!r} (files with suffixes {sorted({Path(f).suffix for f in files})}); "
            f"use one kind of file among {sorted(_FILE_BUILDERS)} or a directory.",
            source=source,
        )
    builder = builders.pop()
    kwargs: dict[str, Any] = {"data_files": files}
    if any(f.endswith(".tsv") for f in files):
        kwargs["sep"] = "\t"
    return builder, kwargs


def _choose_split(available: list[str], requested: str | None, source: str, default="train", slices=False) -> str:
    """`requested` if the source has it (with `slices`, also a slice of it: `train[:100]`, as `load_dataset`
    reads it); else its only split, else `default` if present."""
    if requested is not None:
        if (requested.split("[", 1)[0] if slices else requested) not in available:
            raise DataSourceError(f"{source} has no split {requested!r}; available splits: {available}.", source=source)
        return requested
    if len(available) == 1:
        return available[0]
    if default in available:
        return default
    raise DataSourceError(
        f"{source} has splits {available} and none is {default!r}; choose one with --split.", source=source
    )


# ------------------------------------------------------------------------------------------------ encoding
def _is_tokenizer(processor) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(processor, PreTrainedTokenizerBase) or hasattr(processor, "convert_tokens_to_ids")


def _string_columns(dataset) -> list[str]:
    return [name for name, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]


def _text_columns(dataset, text_column: str | None) -> list[str]:
    columns = dataset.column_names
    if text_column is not None:
        names = [c.strip() for c in text_column.split(",")]
        missing = [c for c in names if c not in columns]
        if missing or len(names) > 2:
            raise DataSourceError(
                f"Text column(s) {missing or names} not usable; the data has columns {columns} (give one column, or "
                "two separated by a comma for sentence pairs).",
                column=text_column,
            )
        return names
    for name in TEXT_COLUMN_NAMES:
        if name in columns:
            return [name]
    candidates = [c for c in _string_columns(dataset) if c not in LABEL_COLUMN_NAMES]
    if len(candidates) == 1:
        return candidates
    raise DataSourceError(
        f"Cannot tell which column holds the text among {columns}; name it with --text-column (Python: "
        "text_column=...)."
    )


def _image_column(dataset, image_column: str | None) -> str:
    import datasets

    columns = dataset.column_names
    if image_column is not None:
        if image_column not in columns:
            raise DataSourceError(
                f"Image column {image_column!r} not found; the data has columns {columns}.", column=image_column
            )
        return image_column
    typed = [name for name, f in dataset.features.items() if isinstance(f, datasets.Image)]
    if len(typed) == 1:
        return typed[0]
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    raise DataSourceError(
        f"Cannot tell which column holds the images among {columns}; name it with --image-column (Python: "
        "image_column=...)."
    )


def _label_column(dataset, label_column: str | None) -> str | None:
    columns = dataset.column_names
    if label_column is not None:
        if label_column not in columns:
            raise DataSourceError(
                f"Label column {label_column!r} not found; the data has columns {columns}.", column=label_column
            )
        return label_column
    return next((name for name in LABEL_COLUMN_NAMES if name in columns), None)


def _tokenize(dataset, tokenizer, text_columns: list[str], max_length: int):
    def encode(batch):
        texts = [batch[c] for c in text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length, padding="max_length")

    return dataset.map(encode, batched=True, desc="Tokenizing")


def _process_images(dataset, image_processor, column: str):
    # One channel per normalisation mean: greyscale processors get "L" images, RGB ones "RGB".
    means = getattr(image_processor, "image_mean", None)
    mode = {1: "L", 3: "RGB"}.get(len(means)) if isinstance(means, list | tuple) else None

    def encode(batch):
        images = [image.convert(mode) if mode and hasattr(image, "convert") else image for image in batch[column]]
        return {"pixel_values": image_processor(images=images, return_tensors="np")["pixel_values"]}

    return dataset.map(encode, batched=True, desc="Processing images")


def _labels_as_model_ids(dataset, column: str, label2id: dict[str, int] | None):
    """The label column renamed `labels`, with class names mapped to the model's ids when `label2id` is given."""
    import datasets

    feature = dataset.features[column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    is_string = getattr(feature, "dtype", None) in ("string", "large_string")
    if label2id is not None and (names is not None or is_string):
        label2id = {str(k): int(v) for k, v in label2id.items()}
        found = names if names is not None else sorted(set(dataset[column]))
        unknown = [name for name in found if str(name) not in label2id]
        if unknown:
            raise LabelSetMismatchError(
                f"The data's classes {unknown[:10]} are not labels of the model, which knows {sorted(label2id)}; "
                "use data with the model's label names, or relabel the data set.",
                label_sets=(unknown, sorted(label2id)),
            )
        if names is not None:
            to_model = [label2id[str(name)] for name in names]
            dataset = dataset.map(lambda b: {"labels": [to_model[i] for i in b[column]]}, batched=True)
        else:
            dataset = dataset.map(lambda b: {"labels": [label2id[str(v)] for v in b[column]]}, batched=True)
    elif is_string:
        raise DataSourceError(
            f"Label column {column!r} holds strings; pass the model's label2id to map them to label ids.", column=column
        )
    elif column != "labels":
        dataset = dataset.rename_column(column, "labels")
    return dataset.cast_column("labels", datasets.Value("int64"))
