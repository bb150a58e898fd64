"""`FuseJob`: one whole fusion run as one typed, serialisable model (what `otfusion-hub fuse` runs).

The CLI flags and their help are generated from its fields, a `job.yaml` holds it whole, and the output's
`fusion_job.yaml` records it pinned. It checks itself (`check_options`, `check_output`, `preflight`) before
anything large happens; `job.run.run_job` runs it. Light to import: `--help` builds from it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FusionConfig, load_config_file
from ..config_fields import NumberRule, check_numbers, field_default
from ..errors import EmptyAlignmentDataError, FusionError, InvalidConfigError, LabelSetMismatchError
from ..output.staging import check_output_dir

if TYPE_CHECKING:  # pragma: no cover
    from .preflight import Preflight

logger = logging.getLogger(__name__)

#: the `dtype` values accepted (torch dtypes of the same names)
DTYPE_NAMES = ("float32", "float16", "bfloat16")
#: the flag groups of `otfusion-hub fuse --help`, by field
DATA, OUTPUT, SAFETY, HUB = "alignment and evaluation data", "compute and output", "safety", "Hub"
MULTI_TASK = "multi-task merge"


@dataclass
class FuseJob:
    """One whole fusion run: parents, data, evaluation, output and push options, and the `FusionConfig`.

    It is the one typed model of a run. The `otfusion-hub fuse` flags and their help are generated from these
    fields (and `config`'s), `otfusion-hub fuse --config job.yaml` loads a YAML file of them whole (mergekit
    style: one file is the whole fusion), and the fused model's `fusion_job.yaml` records them pinned to commits,
    so that `otfusion-hub fuse --config fusion_job.yaml --out DIR` rebuilds the same bytes.

    Args:
        parents: Hub model ids with an optional @revision (user/model@v1, user/model@<commit sha>) or local
            checkpoint directories; two or more.
        out: output directory (refused if it exists and is not empty, unless --overwrite).
        config: the fusion's `FusionConfig`; `config.num_samples` also caps the alignment rows drawn.
        data: alignment data (for --cost activations, --method regmean): a Hub dataset id[@revision], a
            save_to_disk directory, a data directory (imagefolder, csv, ...) or data files; with --multi-task,
            one source per parent in the parents' order (RegMean measures each parent's Gram matrices on its
            own task's rows), or one for all.
        split: split of --data (default: the only split, or train).
        data_seed: seed of the row samples drawn with --num-samples and --eval-num-samples.
        text_column: column holding the text (default: detected).
        image_column: column holding the images (default: detected).
        label_column: column holding the labels (default: label/labels).
        max_length: tokenizer truncation/padding length.
        eval_data: evaluate parents, vanilla average and fused model on this data; with --multi-task, one
            source per task in the parents' order: each task's merged model, its own fine-tune and (with
            --base) the base under its head.
        eval_split: split of --eval-data (default: the only split, or test).
        eval_num_samples: evaluate on this many rows (seeded by --data-seed).
        device: where the passes over the alignment data (statistics, RegMean, repair) and Sinkhorn solves run:
            cpu, cuda, auto (default: cpu); exact solves and refinement stay on the CPU.
        dtype: dtype of the saved fused weights (default: the anchor's; with --multi-task, each parent's).
        max_shard_size: shard model.safetensors above this size, with an index.
        multi_task: merge only the shared encoder and keep every parent's own head (parents fine-tuned from one
            base for different tasks, e.g. different label sets), writing one checkpoint per task under
            --out/<task>/ and --out/README.md (see hf_otfusion.merge_tasks); needs a same-base --method.
        task_names: with --multi-task, each task's folder name (default: the parents' directory or repository
            names, made unique).
        overwrite: replace an existing non-empty --out.
        allow_pickle: load pickle (.bin) weights when a parent has no safetensors; unpickling can run code, so
            only for authors you trust.
        trust_remote_code: allow parents whose model class is code in their repository (it runs on your machine).
        push_to_hub: after a successful fusion, upload --out to this model repository in one commit; with
            --multi-task, each task folder to its own repository REPO-<task>.
        private: create the --push-to-hub repository as private.
        revision: push to this branch (created if missing).
        create_pr: open a pull request instead of committing to the branch.
        command: the command line as run, recorded in the provenance and the card (not a flag).
        progress: progress bars (the CLI's -q turns them off).
    """

    parents: list[str]
    out: Path
    config: FusionConfig = field(default_factory=FusionConfig)
    data: list[str] | None = field(default=None, metadata={"group": DATA, "metavar": "DATA"})
    split: str | None = field(default=None, metadata={"group": DATA})
    data_seed: int = field(default=0, metadata={"group": DATA})
    text_column: str | None = field(default=None, metadata={"group": DATA})
    image_column: str | None = field(default=None, metadata={"group": DATA})
    label_column: str | None = field(default=None, metadata={"group": DATA})
    max_length: int = field(default=128, metadata={"group": DATA})
    eval_data: list[str] | None = field(default=None, metadata={"group": DATA, "metavar": "DATA"})
    eval_split: str | None = field(default=None, metadata={"group": DATA})
    eval_num_samples: int | None = field(default=None, metadata={"group": DATA})
    device: str | None = field(default=None, metadata={"group": OUTPUT})
    dtype: str | None = field(default=None, metadata={"group": OUTPUT})
    max_shard_size: str = field(default="5GB", metadata={"group": OUTPUT})
    multi_task: bool = field(default=False, metadata={"group": MULTI_TASK})
    task_names: list[str] | None = field(default=None, metadata={"group": MULTI_TASK, "metavar": "NAME"})
    overwrite: bool = field(default=False, metadata={"group": SAFETY, "recorded": False})
    allow_pickle: bool = field(default=False, metadata={"group": SAFETY})
    trust_remote_code: bool = field(default=False, metadata={"group": SAFETY})
    push_to_hub: str | None = field(default=None, metadata={"group": HUB, "metavar": "REPO"})
    private: bool = field(default=False, metadata={"group": HUB})
    revision: str | None = field(default=None, metadata={"group": HUB, "metavar": "BRANCH"})
    create_pr: bool = field(default=False, metadata={"group": HUB})
    command: str = field(default="", metadata={"flag": False, "recorded": False})
    progress: bool = field(default=True, metadata={"flag": False, "recorded": False})

    def __post_init__(self) -> None:
        # one data source is a plain string in a job file (and in Python); the run reads a list throughout
        for name in SOURCE_LISTS:
            value = getattr(self, name)
            if isinstance(value, str | Path):
                setattr(self, name, [str(value)])

    # ------------------------------------------------------------------------------------ serialisation
    @classmethod
    def split_dict(cls, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A job mapping (a `job.yaml`) split into its job fields and its `FusionConfig` fields.

        The `FusionConfig` fields stand under `config`, or at the top level (the form of a fused model's
        `fusion_config.yaml`). Unknown keys fail here, so a typo never passes silently.

        Raises:
            FusionError: an unknown key, or a key given both at the top level and under `config`.
        """
        values = dict(values)
        config = dict(values.pop("config", None) or {})
        config_fields = {f.name for f in dataclasses.fields(FusionConfig)}
        for key in [k for k in values if k in config_fields]:
            if key in config:
                raise FusionError(f"{key!r} is given twice in the job, at the top level and under `config`.")
            config[key] = values.pop(key)
        job_fields = set(cls.flag_fields())  # `overwrite` too; `command` and `progress` are set at run time
        unknown = sorted(set(values) - job_fields)
        if unknown:
            raise FusionError(
                f"Unknown FuseJob key(s) {unknown}; valid keys are {sorted(job_fields)} and, at the top level "
                f"or under `config`, the FusionConfig fields {sorted(config_fields)}."
            )
        return values, config

    @classmethod
    def from_dict(cls, values: dict[str, Any], **runtime: Any) -> FuseJob:
        """A job from a mapping (see `split_dict`); `runtime` sets the fields a file never holds (`command`...).

        Raises:
            FusionError: as `split_dict`, a missing `parents` or `out`, or a value `FusionConfig` refuses.
        """
        job, config = cls.split_dict(values)
        missing = [name for name in ("parents", "out") if not job.get(name)]
        if missing:
            raise FusionError(f"The job names no {' and no '.join(missing)}; a fusion needs both.")
        job["out"] = Path(job["out"])
        job["parents"] = [str(parent) for parent in job["parents"]]
        return cls(config=FusionConfig.from_dict(config), **job, **runtime)

    @classmethod
    def flag_fields(cls) -> list[str]:
        """The fields that are `otfusion-hub fuse` flags (all but `config`, `command` and `progress`)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("flag", True) and f.name != "config"]

    def to_dict(self) -> dict[str, Any]:
        """The recorded fields as a plain (YAML-safe) mapping, `config` nested; runtime fields left out."""
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("recorded", True):
                value = getattr(self, f.name)
                record[f.name] = value.to_dict() if f.name == "config" else str(value) if f.name == "out" else value
        for name in SOURCE_LISTS:  # one source recorded as a string: the form a single fusion's job file had
            if record.get(name) is not None and len(record[name]) == 1:
                record[name] = record[name][0]
        return record

    def pinned(self, checked: Preflight) -> FuseJob:
        """This job with every input replaced by its pinned form (`repo@commit`), as pre-flight resolved it."""
        config = self.config
        if checked.base is not None:
            config = replace(config, base=checked.base.pinned)
        data, evaluation = checked.data_sources, checked.eval_sources
        return replace(
            self,
            config=config,
            parents=[parent.pinned for parent in checked.parents],
            data=[source.pinned for source in data] or None,
            split=_one_split(data, None),
            eval_data=[source.pinned for source in evaluation] or self.eval_data,
            eval_split=_one_split(evaluation, self.eval_split),
        )

    def command_line(self, config_file: str | None = None) -> str:
        """The `otfusion-hub fuse` command of this job: its job fields as flags, its config from `config_file`.

        Every recorded field that differs from its default becomes a flag (the same flags `--help` lists).
        """
        words = ["otfusion-hub", "fuse", *self.parents]
        if config_file is not None:
            words += ["--config", config_file]
        for f in dataclasses.fields(self):
            if f.name in ("parents", "config") or not f.metadata.get("recorded", True):
                continue
            value, default = getattr(self, f.name), field_default(f)
            if f.name == "out" or value != default:
                flag = "--" + f.name.replace("_", "-")
                values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
                words += [flag] if value is True else [flag, *values]
        return shlex.join(words)

    @classmethod
    def load(cls, path: str | Path) -> FuseJob:
        """A job from a YAML (or JSON) file, as `otfusion-hub fuse --config job.yaml` reads it."""
        return cls.from_dict(load_config_file(path))

    def check_output(self) -> Path:
        """The resolved `out`, once writing there destroys nothing (see `output.staging.check_output_dir`)."""
        inputs = [*self.parents, *([self.config.base] if self.config.base else []), *(self.data or []),
                  *(self.eval_data or [])]  # fmt: skip
        return check_output_dir(self.out, overwrite=self.overwrite, inputs=inputs)

    def check_options(self) -> None:
        """Raises `FusionError` (`DeviceUnavailableError` for the device) for a job option out of range or of the
        wrong type, so that it fails before any download rather than after the fusion."""
        from ..engine.distributed import resolve_device

        check_numbers(self, JOB_NUMBERS)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise InvalidConfigError(
                f"dtype {self.dtype!r} is not one of {sorted(DTYPE_NAMES)}.", field="dtype", value=self.dtype
            )
        parse_shard_size(self.max_shard_size)
        resolve_device(self.device)
        self.check_push_repos()
        if self.multi_task:
            from ..methods.same_base import SAME_BASE_METHODS

            if self.config.method not in SAME_BASE_METHODS:
                raise InvalidConfigError(
                    f"--multi-task merges the shared encoder with a same-base --method (interpolate, "
                    f"task-arithmetic, regmean), not --method {self.config.method}; add --align ot for parents "
                    "trained apart.",
                    field="multi_task",
                    value=self.config.method,
                )
        elif self.task_names is not None:
            raise InvalidConfigError(
                "--task-names names the tasks of --multi-task; add --multi-task or drop it.",
                field="task_names",
                value=self.task_names,
            )

    def check_push_repos(self) -> None:
        """Raises `InvalidConfigError` when --push-to-hub, or with --multi-task a task's repository
        (`<repo>-<task>`, the task named by --task-names or by default after its parent), is not a valid Hub
        repository id: found before the run, not at upload."""
        if not self.push_to_hub:
            return
        from ..data import is_repo_id
        from ..multitask import task_outputs, task_repo_id

        repos = [self.push_to_hub]
        if self.multi_task:
            names = self.task_names or [output.name for output in task_outputs(self.parents)]
            repos += [task_repo_id(self.push_to_hub, str(name)) for name in names]
        bad = next((repo for repo in repos if not is_repo_id(repo)), None)
        if bad is not None:
            if bad == self.push_to_hub:
                fix = "choose another repository."
            elif self.task_names:
                fix = "choose another repository or task names."
            else:  # a default task name, taken from the parent's folder or repository name
                fix = "choose another repository, or name the tasks with --task-names."
            raise InvalidConfigError(
                f"--push-to-hub: {bad!r} is not a valid Hub repository id (`name` or `namespace/name`: letters, "
                f"digits, '-', '_', '.', no '--' or '..', at most 96 characters); {fix}",
                field="push_to_hub",
                value=bad,
            )

    def check_source_counts(self) -> None:
        """Raises `InvalidConfigError` unless a fusion has one --data and one --eval-data, and --multi-task one
        --data per parent (or one for all) and one --eval-data per task, since each task has its own labels.

        Run once the pre-flight knows whether the run is multi-task (different label sets make it so)."""
        n = len(self.parents)
        allowed = {"data": {1, n}, "eval_data": {n}} if self.multi_task else {"data": {1}, "eval_data": {1}}
        for name, what in (("data", f"{n} parents"), ("eval_data", f"{n} tasks")):
            sources = getattr(self, name)
            if sources is None or len(sources) in allowed[name]:
                continue
            flag = "--" + name.replace("_", "-")
            if not self.multi_task:
                fix = "give one (one per parent is for --multi-task)"
                what = "one fused model"
            else:
                fix = (
                    "give one per parent, in their order, or one for all"
                    if name == "data"
                    else ("give one per task, in the parents' order")
                )
            raise InvalidConfigError(f"{len(sources)} {flag} sources for {what}; {fix}.", field=name, value=sources)

    def preflight(self) -> Preflight:
        """Everything that can fail before a weight download, and what it resolved: the parents (`job.preflight`),
        then the data, read and its first batch encoded for the anchor (`job.inputs.check_job_data`)."""
        from ..data import DataSource
        from ..hub.parents import resolve_parent
        from .inputs import check_job_data
        from .preflight import check_parents, resolve_parents

        self.check_options()
        self.check_output()
        if self.config.needs_data and self.data is None:
            raise EmptyAlignmentDataError(
                f"This fusion ({', '.join(data_options(self.config))}) needs alignment data: pass --data (a Hub "
                "dataset id, a save_to_disk directory, a data directory or files), or drop those options and use "
                "--cost weights for a data-free fusion."
            )
        flags = dict(allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code)
        parents, models = resolve_parents(self.parents, self.config, **flags)
        try:
            checked = check_parents(parents, models, self.config, multi_task=self.multi_task)
        except LabelSetMismatchError:
            from ..methods.same_base import SAME_BASE_METHODS

            if self.multi_task or self.config.method not in SAME_BASE_METHODS:
                raise
            # fine-tunes of one base with different heads, merged by a same-base method: one checkpoint per task
            logger.info(
                "The parents predict different label sets: merging their shared encoder and keeping each head, one "
                "checkpoint per task under --out (the --multi-task mode)."
            )
            self.multi_task = True
            self.check_options()  # a method the multi-task mode does not take fails now, before any download
            checked = check_parents(parents, models, self.config, multi_task=True)  # the same parents, resolved once
        self.check_source_counts()
        base = resolve_parent(self.config.base, **flags) if self.config.base else None
        alignment: list[DataSource] = []
        if self.data is not None and self.config.needs_data:
            for source in self.data:
                alignment.append(DataSource.resolve(source, self.split, self.config.num_samples, self.data_seed))
                alignment[-1].choose_split()  # a missing split fails now, and --dry-run shows the one used
        evaluation: list[DataSource] = []
        if self.eval_data is not None:
            from ..output.card import pipeline_and_auto_class

            # the parents' own classes: with --multi-task, the plans are of their encoders
            architectures = {
                (p.config.get("architectures") or ["?"])[0]: p.config.get("model_type") for p in checked.parents
            }
            if not self.multi_task:
                architectures = {checked.anchor_plan.architecture: checked.anchor_plan.model_type}
            for architecture, model_type in architectures.items():
                task, _ = pipeline_and_auto_class(architecture, str(model_type))
                if task not in ("image-classification", "text-classification"):
                    raise FusionError(
                        f"--eval-data scores classifiers, but the parents are {architecture} ({task}); leave "
                        "--eval-data out, or fuse classification checkpoints."
                    )
            for source in self.eval_data:
                evaluation.append(
                    DataSource.resolve(
                        source, self.eval_split, self.eval_num_samples, self.data_seed, default_split="test"
                    )
                )
                evaluation[-1].choose_split()
        checked = replace(
            checked, base=base, alignment_data=alignment[0] if alignment else None,
            eval_data=evaluation[0] if evaluation else None, data_sources=alignment, eval_sources=evaluation,
        )  # fmt: skip
        check_job_data(self, checked)  # no rows, wrong image size, too long sequences: before any download
        return checked


#: the numeric job options (the FusionConfig fields have their own table in `config`)
JOB_NUMBERS = {
    "data_seed": NumberRule(int, 0, 2**32 - 1),
    "max_length": NumberRule(int, 1),
    "eval_num_samples": NumberRule(int, 1, optional=True),
}
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
#: the fields that take one data source, or one per parent / task with --multi-task
SOURCE_LISTS = ("data", "eval_data")


def _one_split(sources: list, default: str | None) -> str | None:
    """The split every source used (the one `--split` to record), else `default`: each source then picks its own
    again, the same way, from its pinned revision."""
    splits = {source.split for source in sources}
    return splits.pop() if len(splits) == 1 else default


def parse_shard_size(size: str | int) -> int:
    """Bytes in a `max_shard_size` (`5GB`, `500MB`, or an int), the forms `save_pretrained` accepts.

    Raises:
        InvalidConfigError: anything else, or a size that is not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = size.strip() if isinstance(size, str) else ""
    try:
        value = float(text[:-2]) * _SIZE_UNITS[text[-2:].upper()]
    except (KeyError, ValueError):
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise InvalidConfigError(
            f"max_shard_size (--max-shard-size) {size!r} is not a size; write a positive number with a unit: 5GB, "
            "500MB, 200KB or 1TB.",
            field="max_shard_size",
            value=size,
        )
    return int(value)


def data_options(config: FusionConfig) -> list[str]:
    """The options of `config` that read alignment data, as `name=value` (`["cost=activations", "repair=all"]`)."""
    defaults = FusionConfig()
    needs = {
        "cost": config.aligns_on_activations,
        "method": config.method == "regmean",
        "repair": config.repair != defaults.repair,
        "refine_steps": config.refine_steps != defaults.refine_steps,
        "quality": config.quality != defaults.quality,  # it sets refine_steps, or RegMean and repair
    }
    named = [f"{name}={getattr(config, name)}" for name, needed in needs.items() if needed]
    return named or [f"method={config.method}"]  # an option this table does not know yet: at least the method
