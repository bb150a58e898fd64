"""`merge_tasks`: one shared encoder for fine-tunes of one base trained on different tasks, each keeping its head.

Fine-tunes of one base for different tasks (3-way NLI, 5-way sentiment, ...) have the same encoder shapes but
heads with different label sets, so `fuse` refuses them (`LabelSetMismatchError`): their class rows cannot be
averaged. A multi-task merge splits each parent into

- its **encoder**: the model's base model, the submodule transformers' `base_model_prefix` names (`bert.` in
  `BertForSequenceClassification`, `vit.` in `ViTForImageClassification`): what `AutoModel` loads, shaped
  alike in every fine-tune of one base; and
- its **head**: every other parameter (a classifier, RoBERTa's two-layer classification head, ...), the
  task's own,

merges the encoders with a same-base method through `fuse_with_diagnostics` (the same checks, alignment and
`merge_parameters` as `fuse`, on encoder-only views of the parents: no second merging loop), and grafts each
parent's head back onto the merged encoder. The result is one model per task, of the parent's class and config
(its `id2label`), whose encoder tensors are identical across tasks. With `align="ot"`, a non-anchor parent's
head is re-expressed in the anchor's basis with that parent's maps (its input axis reads the aligned space);
otherwise every head is its parent's, byte for byte.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedModel

from ..alignment import AlignedOutput, _describe, _folder_name, _is_model, unique_names
from ..checkpoints import Checkpoint, ModelOrPath, load_parent
from ..config import FusionConfig
from ..engine.align import align_tensor
from ..engine.compatibility import check_finite
from ..engine.plan import base_prefix, resolve_plan
from ..engine.prepare import check_parent_count
from ..engine.spec import AlignmentSpec, load_spec
from ..errors import IncompatibleModelsError, InvalidConfigError
from ..fusion import fuse_with_diagnostics
from ..methods.same_base import SAME_BASE_METHODS
from .cards import overview, task_card
from .result import MultiTaskResult, RunRecord, parent_location

logger = logging.getLogger(__name__)


def merge_tasks(
    parents: Sequence[ModelOrPath],
    config: FusionConfig | None = None,
    *,
    base: ModelOrPath | None = None,
    data: list | None = None,
    task_names: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> MultiTaskResult:
    """Merges the shared encoder of fine-tunes for different tasks and keeps every parent's own head.

    Args:
        parents: two or more task models of one `model_type` (any head classes, any label sets), as loaded
            models, checkpoints, local directories or Hub ids; their encoders must have one shape.
        config: a same-base method (`interpolate`, `task-arithmetic` with `base`, TIES/DARE options, or
            `regmean`), optionally `align="ot"`; defaults to `FusionConfig(method="interpolate")`.
        base: the parents' shared ancestor for `task-arithmetic` (a bare encoder such as `BertModel` or a
            model with a head, whose head is ignored); defaults to `config.base`.
        data: one entry per parent: that task's inputs (a `datasets.Dataset`, DataLoader or iterable of batch
            dicts, as for `fuse`). `regmean` measures each parent's Gram matrices on its own entry; an
            activation-cost alignment (`align="ot"`, `cost="activations"`) runs every parent on the anchor's.
        task_names: each task's name (its folder under `out`); default: the parents' directory or repository
            names (`task-K` for a model object without a name), made unique.
        out: when given, write `out/<task>/` for every task (safetensors, config, the parent's processor files
            when it is a local directory, `fusion_config.yaml`, a model card) and `out/README.md` linking them,
            through one staging directory swapped into place (`hf_otfusion.output.staging`). A CLI run
            (`otfusion-hub fuse --multi-task`) also records `fusion_job.yaml` and each task's
            `fusion_provenance.json` (see `RunRecord`).
        overwrite: replace a non-empty `out`.
        spec, progress, device: as for `fuse`.

    Returns:
        A `MultiTaskResult`; `result.models[name]` is task `name`'s model.

    Raises:
        IncompatibleModelsError: (and its subclasses) parents whose encoders differ (model type, depth,
            vocabulary, widths) or a parent without a head.
        InvalidConfigError: a method that is not same-base, `data` not one entry per parent, bad task names.
        FusionError: any other error `fuse` raises for these encoders (non-finite weights, missing data, ...).
    """
    config = config or FusionConfig(method="interpolate")
    if config.method not in SAME_BASE_METHODS:
        raise InvalidConfigError(
            f"merge_tasks merges the shared encoder with a same-base method {SAME_BASE_METHODS}, not "
            f"method={config.method!r}; for parents trained apart, use a same-base method with align='ot'.",
            field="method",
            value=config.method,
        )
    check_parent_count(len(parents), config)
    if data is not None and (not isinstance(data, list | tuple) or len(data) != len(parents)):
        raise InvalidConfigError(
            f"merge_tasks takes data as one entry per parent (each task's own inputs): {len(parents)} entries, got "
            f"{type(data).__name__}" + (f" of {len(data)}" if isinstance(data, list | tuple) else "") + ".",
            field="data",
            value=len(data) if isinstance(data, list | tuple) else type(data).__name__,
        )
    outputs = task_outputs(parents, task_names)
    target = None
    if out is not None:
        from ..output.staging import check_output_dir

        inputs = [parent_location(p) for p in [*parents, *([base] if base is not None else [])] if not _is_model(p)]
        if config.base and base is None:
            inputs.append(config.base)
        target = check_output_dir(out, overwrite=overwrite, inputs=inputs, flag="out")
    if isinstance(spec, str | Path):
        spec = load_spec(spec)

    models = [load_parent(parent) for parent in parents]
    check_finite(models)  # heads included: the encoder merge checks the encoders only
    views = [encoder_view(model, k) for k, model in enumerate(models)]
    anchor = config.anchor
    regmean = config.method == "regmean"
    result = fuse_with_diagnostics(
        views, data[anchor] if data is not None else None, config, spec=spec, base=base, progress=progress,
        device=device, parent_data=list(data) if regmean and data is not None else None,
    )  # fmt: skip
    merged = {name: param.detach() for name, param in result.model.named_parameters()}
    result.model = None  # type: ignore[assignment]  # its tensors are copied into each task model

    tasks: dict[str, PreTrainedModel] = {}
    prefixes: dict[str, str] = {}
    heads: dict[str, list[str]] = {}
    for k, (source, model, output) in enumerate(zip(parents, models, outputs, strict=True)):
        plan = resolve_plan(model, spec) if k in result.maps else None
        task = copy.deepcopy(model) if _is_model(source) else model  # never change a model the caller holds
        prefix = base_prefix(task)
        head = []
        with torch.no_grad():
            for name, param in task.named_parameters():
                if name.startswith(prefix):
                    param.copy_(merged[name[len(prefix) :]].to(param.dtype))
                    continue
                head.append(name)
                if plan is not None:  # the head reads the encoder's output, now in the anchor's basis
                    aligned = align_tensor(param.detach(), plan.parameters[name], result.maps[k])
                    param.copy_(aligned.to(param.dtype))
        tasks[output.name], prefixes[output.name], heads[output.name] = task.eval(), prefix, head
    del models, views
    multitask = MultiTaskResult(tasks, result.config, result, prefixes, heads)
    if target is not None:
        from ..engine.distributed import is_main_process, process_state

        if is_main_process(process_state(None)):  # under torchrun / accelerate launch, the main process writes
            multitask.out = write_tasks(multitask, outputs, target, overwrite=overwrite, base=base or config.base)
    return multitask


def encoder_view(model: PreTrainedModel, index: int = 0) -> PreTrainedModel:
    """The parent's base model (`model.bert`), sharing its tensors, under a config without labels.

    The view is a shallow copy of the submodule, so that its `config` can drop the task's label set (which the
    compatibility checks of `fuse` compare) without touching the parent's.

    Raises:
        IncompatibleModelsError: the model is a bare encoder (no base-model prefix, hence no head to keep).
    """
    prefix = base_prefix(model)
    if not prefix:
        raise IncompatibleModelsError(
            f"Parent {index} ({type(model).__name__}) is a bare encoder without a task head, so a multi-task merge "
            "has no head of it to keep; merge bare encoders with fuse(), or pass the task models.",
            parent=index,
        )
    view = copy.copy(getattr(model, prefix[:-1]))
    view.config = copy.deepcopy(view.config)
    view.config.id2label = None  # the labels belong to the head, which stays out of the merge
    return view


def base_with_head(base: ModelOrPath, parent: ModelOrPath) -> PreTrainedModel:
    """Task `parent`'s head on the `base`'s encoder, unmerged: the baseline a multi-task merge is measured against.

    It scores what the head alone brings to the base encoder, so a merge that keeps most of the fine-tune's
    accuracy above it is shown to keep what the fine-tune learnt in the encoder, not just the head.

    Args:
        base: the parents' shared ancestor: a bare encoder (`BertModel`) or a model with a head (ignored).
        parent: the task's fine-tune (a model is copied, never changed).

    Raises:
        IncompatibleModelsError: the base's encoder does not have the parent's encoder parameters and shapes.
    """
    task = copy.deepcopy(parent) if isinstance(parent, PreTrainedModel) else load_parent(parent)
    ancestor = load_parent(base)
    prefix, ancestor_prefix = base_prefix(task), base_prefix(ancestor)
    if not prefix:
        raise IncompatibleModelsError(f"{type(task).__name__} is a bare encoder, without a head; pass the fine-tune.")
    encoder = getattr(ancestor, ancestor_prefix[:-1]) if ancestor_prefix else ancestor
    try:
        getattr(task, prefix[:-1]).load_state_dict(encoder.state_dict())
    except RuntimeError as error:
        raise IncompatibleModelsError(
            f"The base ({type(ancestor).__name__}) does not hold the encoder of {type(task).__name__}: {error}"
        ) from error
    return task.eval()


def task_outputs(parents: Sequence[ModelOrPath], task_names: list[str] | None = None) -> list[AlignedOutput]:
    """Each task's folder name, label, Hub id and processor files (see `alignment._describe`).

    Raises:
        InvalidConfigError: `task_names` of the wrong length, repeated, or not a plain folder name.
    """
    from ..data import is_repo_id

    outputs = []
    for k, parent in enumerate(parents):
        output = _describe(parent, k)
        if _is_model(parent) and output.name == f"parent-{k}":
            output = replace(output, name=f"task-{k}")
        if isinstance(parent, Checkpoint) and parent.name and parent.name != parent.location:
            # a downloaded Hub parent (`user/model@sha` in a snapshot directory): named by its repository
            repo = parent.name.partition("@")[0]
            hub = is_repo_id(repo) and not Path(repo).exists()
            output = replace(output, name=Path(repo).name, label=parent.name, repo_id=repo if hub else None)
        outputs.append(output)
    if task_names is None:
        return unique_names(outputs)
    names = [str(name) for name in task_names]
    problem = None
    if len(names) != len(parents):
        problem = f"{len(names)} task names for {len(parents)} parents; give one each"
    elif len(set(names)) != len(names):
        problem = f"task names {names} repeat a name; each task needs its own folder"
    elif any(_folder_name(name) != name or name in ("", ".", "..") for name in names):
        bad = next(name for name in names if _folder_name(name) != name or name in ("", ".", ".."))
        problem = f"task name {bad!r} is not a plain folder name (letters, digits, '-', '_', '.')"
    if problem:
        raise InvalidConfigError(f"merge_tasks got {problem}.", field="task_names", value=names)
    return [replace(output, name=name) for output, name in zip(outputs, names, strict=True)]


def write_tasks(
    result: MultiTaskResult,
    outputs: list[AlignedOutput],
    target: Path,
    *,
    overwrite: bool = False,
    base=None,
    record: RunRecord | None = None,
) -> Path:
    """Writes `target/<task>/` for every task and `target/README.md`, through one staging directory.

    `target` is the path `output.staging.check_output_dir` returned. With a `record` (a CLI run), the top level
    and every task folder also get `fusion_job.yaml`, and every task folder its `fusion_provenance.json`. Nothing
    is written when a task model has a non-finite value.
    """
    from ..output.provenance import CONFIG_FILE, JOB_FILE, weight_hashes
    from ..output.staging import check_fused_finite, stage_output

    for model in result.models.values():
        check_fused_finite(model, record.dtype if record is not None else None)
    config_yaml = yaml.safe_dump(result.config.to_dict(), sort_keys=False)
    job_yaml = yaml.safe_dump(record.job, sort_keys=False) if record is not None else ""
    with stage_output(target, overwrite=overwrite) as stage:
        for k, ((name, model), output) in enumerate(zip(result.models.items(), outputs, strict=True)):
            folder = stage.path / name
            model.save_pretrained(folder, max_shard_size=record.max_shard_size if record else "5GB")  # safetensors
            source = output.processor_dir
            if source is not None:
                for file in output.processor_files:
                    shutil.copyfile(source / file, folder / file)
            (folder / CONFIG_FILE).write_text(config_yaml)
            if record is not None:
                (folder / JOB_FILE).write_text(job_yaml)  # a task pushed alone still holds its recipe
                provenance = record.provenance[name]
                provenance.outputs = weight_hashes(folder)
                provenance.save(folder)
            task_card(result, outputs, k, base=base, record=record).save(folder / "README.md")
        (stage.path / "README.md").write_text(overview(result, outputs, base=base, record=record))
        if record is not None:
            (stage.path / JOB_FILE).write_text(job_yaml)
        stage.publish()
    logger.info("multi-task merge written to %s: %s", target, ", ".join(result.models))
    return target
