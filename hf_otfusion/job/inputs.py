"""The job's data as the anchor reads it: the anchor's processor, the encoded rows, and their pre-flight check.

`run_job` encodes the alignment and evaluation data with the anchor's tokenizer or image processor just before
the statistics pass. Pre-flight runs the same encoding on the first batch of rows (`check_job_data`), so data
the model cannot read (no rows, images of another size or channel count, sequences longer than the position
table, evaluation rows without labels) fails before any weight is downloaded, not inside the first forward
pass after the download.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..data import MODEL_INPUT_COLUMNS, DataSource, encode_with_anchor_processor, load_processor
from ..data_checks import FIXES_FOR_GIVEN_INPUTS, check_model_inputs
from ..engine.held_back import check_enough_batches
from ..engine.passes import num_batches
from ..errors import FusionError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import FusionConfig
    from ..hub.parents import Parent
    from .preflight import Preflight


class JobInputs(Protocol):
    """What the encoding reads of a job (`FuseJob` has it all): named here so this module needs no `FuseJob`."""

    parents: list[str]
    config: FusionConfig
    text_column: str | None
    image_column: str | None
    label_column: str | None
    max_length: int
    trust_remote_code: bool


def anchor_processor(parent: Parent, trust_remote_code: bool = False):
    """The parent's tokenizer or image processor, or `None` when it ships none.

    A Hub parent that is not downloaded yet (pre-flight) gets only its processor files, pinned to its commit:
    small files, and the ones the run copies next to the fused weights anyway.
    """
    if not parent.processor_files:
        return None
    directory = parent.directory
    if directory is None:
        from huggingface_hub import snapshot_download

        directory = Path(
            snapshot_download(parent.repo_id, revision=parent.commit, allow_patterns=parent.processor_files)
        )
    return load_processor(directory, trust_remote_code=trust_remote_code)


def encoded(job: JobInputs, source: DataSource | None, processor, label2id, rows=None):
    """`source`'s rows (or `rows`, a subset of them) as model inputs, encoded with the job's column options."""
    if source is None:
        return None
    dataset = source.load() if rows is None else rows  # a missing split or file fails here, with its own message
    missing = (
        f"The anchor ({job.parents[job.config.anchor]}) ships no tokenizer or image processor files, so give data "
        "that already holds model inputs."
    )
    return encode_with_anchor_processor(
        dataset, processor, missing, text_column=job.text_column, image_column=job.image_column,
        label_column=job.label_column, max_length=job.max_length, label2id=label2id,
    )  # fmt: skip


def check_job_data(job: JobInputs, checked: Preflight) -> None:
    """Raises `FusionError` when the job's alignment or evaluation data cannot be read by the anchor.

    Each source's rows are loaded (the split chosen, the sample cap applied) and their first batch is encoded
    as the run will encode them, then compared with the anchor's embeddings (`data_checks.check_model_inputs`).
    `datasets` caching is off meanwhile: its cache files would land next to a saved data set, and a dry run
    writes nothing.

    Raises:
        DataSourceError: no rows; images or sequences the anchor cannot take (both sizes named, and the fix);
            a column that cannot be found; `LabelSetMismatchError` for class names the model does not know.
        FusionError: evaluation data without a label column.
    """
    checks = _sources_to_check(checked)
    if not checks:
        return
    from .preflight import meta_model

    models: dict[int, object] = {}
    processors: dict[int, object] = {}
    with _no_cache_files():
        for flag, source, k in checks:
            if k not in models:
                models[k] = meta_model(checked.parents[k], job.trust_remote_code)
                processors[k] = anchor_processor(checked.parents[k], job.trust_remote_code)
            model, label = models[k], f"{flag} {source.source}"
            rows = source.load()
            if flag == "--data" and job.config.refine_steps:  # refinement holds batches back: enough of them?
                check_enough_batches(num_batches(rows, job.config.batch_size, job.config.num_samples))
            first = rows.select(range(min(len(rows), 8)))
            inputs = encoded(job, source, processors[k], model.config.label2id, first)  # type: ignore[attr-defined]
            check_encoded(rows, inputs, model, source=label, text_column=job.text_column, image_column=job.image_column)
            if flag == "--eval-data" and "labels" not in inputs.column_names:
                raise FusionError(f"{label} has no label column; name it with --label-column.")


def _sources_to_check(checked: Preflight) -> list[tuple[str, DataSource, int]]:
    """(flag, source, index of the parent that reads it) for every alignment and evaluation source.

    One source serves the whole fusion and is read by the anchor; one source per parent (`--multi-task`) is read
    by its own parent, with that parent's processor and labels, as the run encodes it.
    """
    checks = []
    for flag, sources, single in (
        ("--data", checked.data_sources, checked.alignment_data),
        ("--eval-data", checked.eval_sources, checked.eval_data),
    ):
        listed = sources or ([single] if single is not None else [])
        for k, source in enumerate(listed):
            checks.append((flag, source, k if len(listed) > 1 else checked.anchor))
    return checks


@contextmanager
def _no_cache_files():
    """`datasets` transforms write their results to a temporary directory meanwhile, not next to the data."""
    import datasets

    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def check_encoded(rows, inputs, model, *, source: str, text_column=None, image_column=None) -> None:
    """Raises `DataSourceError` when `inputs`, encoded from `rows`, do not fit `model` (`check_model_inputs`).

    The fix named depends on who made the inputs: for raw text or images encoded here, `--max-length` or the
    anchor's image processor; for rows that held model inputs already, the data itself.
    """
    raw_columns = text_column or image_column  # named raw columns are encoded even beside model inputs
    as_given = any(c in rows.column_names for c in MODEL_INPUT_COLUMNS) and not raw_columns
    check_model_inputs(inputs[0], model, source=source, **(FIXES_FOR_GIVEN_INPUTS if as_given else _FIXES_ENCODED))


#: the fixes `check_model_inputs` names for data the run encodes (`data_checks.FIXES_FOR_GIVEN_INPUTS` for the rest)
_FIXES_ENCODED = dict(
    fix_length="pass --max-length {n} or less",
    fix_images="set the anchor's image processor (preprocessor_config.json) to resize to {h}x{w} (do_resize: true, "
    "size: {{height: {h}, width: {w}}}) with {c} value(s) in image_mean, or fuse models built for these images",
)
