"""Running a checked `FuseJob`: from pinned parent ids to a finished, documented output directory.

    pre-flight (pin SHAs, read configs + headers, check compatibility, resolve data)   <- no weights yet
    -> download pinned weights -> encode data -> fuse (two parents loaded at a time)
    -> write the weights into a temporary sibling of `out` and free the fused model
    -> evaluate (optional) and the readiness report, loading models as they are needed (two at most)
    -> add processor + fusion_config.yaml + fusion_job.yaml + fusion_provenance.json + README.md, then rename
       the temporary directory into place (a failure never leaves a half checkpoint)

Pushing the finished directory is a separate step (`hub.push.push_folder`), so a failed upload keeps the output.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from ..checkpoints import Checkpoint
from ..config import FusionConfig
from ..errors import FusionError
from ..hub.parents import Parent, download_parents, load_parent_model, parent_checkpoint
from ..output.provenance import CONFIG_FILE, JOB_FILE, Provenance, package_versions, utc_now, weight_hashes
from ..output.staging import StagedOutput, check_fused_finite, stage_output
from .inputs import anchor_processor, encoded
from .preflight import Preflight

if TYPE_CHECKING:  # pragma: no cover
    from .fuse_job import FuseJob

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_job(job: FuseJob, checked: Preflight | None = None):
    """Runs `job` (pre-flight unless `checked` is given, download, fuse, evaluate, write `out`): a `FusionResult`.

    Everything is written into a temporary sibling of `out`, renamed into place at the end, so a failure
    never leaves a half-written output. The result's model is the one written, loaded back from `out`.
    Under `torchrun` / `accelerate launch` every process fuses, but only the main one writes.
    """
    from ..engine.distributed import is_main_process, process_state
    from ..fusion import fuse_with_diagnostics

    checked = checked or job.preflight()
    if job.multi_task:
        return _run_multi_task(job, checked)
    parents, anchor = checked.parents, checked.anchor
    _warn_license_conflict(parents)
    download_parents([*parents, *([checked.base] if checked.base else [])], anchor, progress=job.progress)
    # checkpoints, not models: `fuse` loads each when its turn comes, holding two models at a time
    sources = [parent_checkpoint(p, trust_remote_code=job.trust_remote_code) for p in parents]
    base = load_parent_model(checked.base, trust_remote_code=job.trust_remote_code) if checked.base else None
    processor = anchor_processor(parents[anchor], job.trust_remote_code)
    label2id = sources[anchor].config().label2id
    alignment = encoded(job, checked.alignment_data, processor, label2id)
    result = fuse_with_diagnostics(
        sources, data=alignment, config=job.config, base=base, progress=job.progress, device=job.device
    )
    if not is_main_process(process_state(None)):
        return result  # under torchrun / accelerate launch, only the main process writes the output
    out = job.check_output()  # again: the fusion took a while
    with stage_output(out, overwrite=job.overwrite) as stage:  # swapped into place by `_finish`
        staging = stage.path
        if job.dtype is not None:
            result.model.to(DTYPES[job.dtype])  # type: ignore[arg-type]  # transformers types .to loosely
        check_fused_finite(result.model, job.dtype)  # a NaN model is never written, hence never pushed
        result.model.save_pretrained(staging, max_shard_size=job.max_shard_size)
        # the fused model is freed here: the steps below load it, and the parents, when they need them, so
        # that no step holds more than two models
        result.model = None  # type: ignore[assignment]  # freed: set to the written model at the end
        fused = Checkpoint(str(staging), name="the fused model")
        evaluation = None
        if checked.eval_data is not None:
            evaluation = _evaluate(job, checked, sources, fused, processor, label2id)
        from ..methods.readiness import readiness_report

        # the fusion's own maps when it aligned; the report solves data-free ones for unaligned methods
        own = FusionConfig(cost="weights", solver="exact", anchor=job.config.anchor)
        readiness = readiness_report(
            sources, config=job.config if result.maps else own, maps=result.maps or None, progress=job.progress
        )
        provenance = _provenance(job, checked, result, evaluation)
        provenance.readiness = readiness.to_dict()
        _finish(job, stage, parents[anchor], provenance)
    result.model = Checkpoint(str(out)).load()  # the weights as written (in `dtype`)
    return result


def _run_multi_task(job: FuseJob, checked: Preflight):
    """`--multi-task`: `merge_tasks` on the downloaded parents, then `out/<task>/` and `out/README.md` written with
    the run's record: `fusion_job.yaml` (pinned, task names included) at the top level and in every task folder,
    and per task its `fusion_provenance.json`, its evaluation (`--eval-data`, one source per task) and card.

    `--data` is one source per parent (RegMean's Gram pass on each task's own rows; an activation-cost alignment
    runs every parent on the anchor's) or one for all. Returns the `MultiTaskResult`, its models in `--dtype`.
    """
    from ..engine.distributed import is_main_process, process_state
    from ..multitask import RunRecord, merge_tasks, task_outputs, task_repo_id, write_tasks

    for parent in checked.parents:  # each task folder gets its own parent's tokenizer / image processor
        download_parents([parent], anchor=0, progress=job.progress)
    if checked.base:
        download_parents([checked.base], anchor=-1, progress=job.progress)
    sources = [parent_checkpoint(p, trust_remote_code=job.trust_remote_code) for p in checked.parents]
    base = load_parent_model(checked.base, trust_remote_code=job.trust_remote_code) if checked.base else None
    processors = [anchor_processor(parent, job.trust_remote_code) for parent in checked.parents]
    label2ids = [source.config().label2id for source in sources]
    data, anchor = None, checked.anchor
    if len(checked.data_sources) == 1:  # one source for every task: encoded once, with the anchor's processor
        data = [encoded(job, checked.data_sources[0], processors[anchor], label2ids[anchor])] * len(sources)
    elif checked.data_sources:  # each parent's own rows, encoded with its own processor and labels
        data = [encoded(job, d, processors[k], label2ids[k]) for k, d in enumerate(checked.data_sources)]
    result = merge_tasks(
        sources, job.config, base=base, data=data, task_names=job.task_names, progress=job.progress,
        device=job.device,
    )  # fmt: skip
    if not is_main_process(process_state(None)):
        return result  # under torchrun / accelerate launch, only the main process writes the output
    out = job.check_output()  # again: the merge took a while
    if job.dtype is not None:
        for model in result.models.values():
            model.to(DTYPES[job.dtype])  # type: ignore[arg-type]  # transformers types .to loosely
    outputs = task_outputs(sources, job.task_names)
    pinned = replace(job.pinned(checked), multi_task=True, task_names=result.task_names)
    reproduce = pinned.command_line(config_file=CONFIG_FILE)  # from a task folder, which holds fusion_config.yaml
    record = RunRecord(
        job=pinned.to_dict(),
        provenance={},
        repo_ids={name: task_repo_id(job.push_to_hub, name) for name in result.task_names} if job.push_to_hub else None,
        max_shard_size=job.max_shard_size,
        dtype=job.dtype,
    )
    for k, name in enumerate(result.task_names):
        evaluation = None
        if checked.eval_sources:
            evaluation = _evaluate_task(job, checked, k, sources[k], base, result.models[name], processors[k])
        provenance = _provenance(job, checked, result.encoder, evaluation)
        # the task's own class (its parent's); `anchor` stays the merge's, whose basis the shared encoder is in
        provenance.architecture = (checked.parents[k].config.get("architectures") or ["?"])[0]
        if checked.data_sources:
            provenance.alignment_data = checked.data_sources[min(k, len(checked.data_sources) - 1)].to_dict()
        provenance.eval_data = checked.eval_sources[k].to_dict() if checked.eval_sources else None
        provenance.reproduce, provenance.job = reproduce, record.job
        record.provenance[name] = provenance
    base_label = checked.base.pinned if checked.base else None
    result.out = write_tasks(result, outputs, out, overwrite=job.overwrite, base=base_label, record=record)
    return result


# ------------------------------------------------------------------------------------------- steps
def _warn_license_conflict(parents: list[Parent]) -> None:
    """Says, before any weight is downloaded, that the parents' licences differ (the card repeats it)."""
    from ..output.card import license_conflict

    note = license_conflict([p.license for p in parents], [p.name for p in parents])
    if note is not None:
        logger.warning(note)


def _evaluate(job: FuseJob, checked: Preflight, sources, fused, processor, label2id) -> dict[str, Any]:
    """Parents, vanilla average and fused model on the same evaluation rows.

    Every row's model is loaded (the fused one from the staged weights), or the vanilla average built, when
    the row is scored, and freed after it.
    """
    from ..engine.compatibility import same_widths
    from ..fusion import fuse_with_diagnostics
    from ..output.card import FUSED_ROW, VANILLA_ROW
    from ..train.evaluation import evaluate_models

    dataset = encoded(job, checked.eval_data, processor, label2id)  # labelled: checked in pre-flight
    rows: dict[str, Any] = {}
    for k, (parent, source) in enumerate(zip(checked.parents, sources, strict=True)):
        rows[f"parent {k}: {parent.name}"] = source
    if job.config.method != "vanilla" and same_widths(checked.plans):  # other widths: no plain average
        vanilla = FusionConfig(method="vanilla", anchor=job.config.anchor, weights=job.config.weights)
        rows[VANILLA_ROW] = lambda: fuse_with_diagnostics(sources, config=vanilla, progress=False).model
    rows[FUSED_ROW] = fused
    split = checked.eval_data.split if checked.eval_data else None
    return evaluate_models(rows, dataset, split=str(split), progress=job.progress).to_dict()


def _evaluate_task(job: FuseJob, checked: Preflight, k: int, source, base, merged, processor) -> dict[str, Any]:
    """Task `k`'s merged model next to its own fine-tune and, with a base, the base under that head, on the
    task's `--eval-data` (encoded with its own parent's processor and labels): `train.evaluation.evaluate_task`,
    as `otfusion-hub eval` scores a multi-task output."""
    from ..train.evaluation import evaluate_task

    data = checked.eval_sources[k]
    dataset = encoded(job, data, processor, source.config().label2id)
    if "labels" not in dataset.column_names:
        raise FusionError(f"--eval-data {data.pinned} has no label column; name it with --label-column.")
    table = evaluate_task(
        merged, source, dataset, own_name=checked.parents[k].name, base=base, split=str(data.split),
        progress=job.progress,
    )  # fmt: skip
    return table.to_dict()


def _provenance(job: FuseJob, checked: Preflight, result, evaluation) -> Provenance:
    parents = checked.parents
    anchor_config = parents[checked.anchor].config
    data = checked.alignment_data.to_dict() if checked.alignment_data else None
    options = {"dtype": job.dtype, "max_shard_size": job.max_shard_size}
    return Provenance(
        parents=[p.to_dict() for p in parents],
        anchor=checked.anchor,
        architecture=(anchor_config.get("architectures") or ["?"])[0],
        model_type=str(anchor_config.get("model_type")),
        config=job.config.to_dict(),
        base=checked.base.to_dict() if checked.base else None,
        alignment_data=data,
        eval_data=checked.eval_data.to_dict() if checked.eval_data else None,
        evaluation=evaluation,
        diagnostics=[_plain(d.to_dict()) for d in result.diagnostics],
        quality=_plain(quality_record(result)),
        timings={k: round(float(v), 3) for k, v in result.timings.items()},
        command=job.command,
        reproduce=job.pinned(checked).command_line(config_file=CONFIG_FILE),
        job=job.pinned(checked).to_dict(),
        options=options,
        versions=package_versions(),
        created=utc_now(),
    )


def _finish(job: FuseJob, stage: StagedOutput, anchor: Parent, provenance: Provenance) -> None:
    """Completes the staging directory (which holds the weights) with processor, config, provenance and card,
    then swaps it into `out`; `stage_output` removes it on failure."""
    from ..output.card import render_card

    out, staging = Path(job.out), stage.path
    assert anchor.directory is not None  # downloaded
    for name in anchor.processor_files:  # the anchor's tokenizer / image processor, byte for byte
        shutil.copyfile(anchor.directory / name, staging / name)
    (staging / CONFIG_FILE).write_text(yaml.safe_dump(job.config.to_dict(), sort_keys=False))
    (staging / JOB_FILE).write_text(yaml.safe_dump(provenance.job, sort_keys=False))
    provenance.outputs = weight_hashes(staging)
    provenance.save(staging)
    card = render_card(provenance, repo_id=job.push_to_hub or str(out))
    card.save(staging / "README.md")
    stage.publish()


def quality_record(result) -> dict:
    """What the quality options did in a `FusionResult`, for the provenance record and the card."""
    kinds: dict[str, set[str]] = {}
    for d in result.diagnostics:
        kinds.setdefault(d.space.split(".")[0], set()).add(d.kind)
    return {
        "map_kinds": {space: sorted(found) for space, found in kinds.items()},
        "repair": [site.to_dict() for site in result.repair],
        "refine": result.refine.to_dict() if result.refine is not None else None,
        "choice": result.choice.to_dict() if result.choice is not None else None,
        "refit": [layer.to_dict() for layer in result.refit],
    }


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a diagnostics record (tuples to lists, numpy scalars to floats)."""
    return json.loads(json.dumps(record, default=float))
