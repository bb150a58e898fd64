"""From parent ids to a finished, documented output directory: what `otfusion-hub fuse` runs.

    pre-flight (pin SHAs, read configs + headers, check compatibility, resolve data)   <- no weights yet
    -> download pinned weights -> encode data -> fuse (two parents loaded at a time)
    -> write the weights into a temporary sibling of `out` and free the fused model
    -> evaluate (optional) and the readiness report, loading models as they are needed (two at most)
    -> add processor + fusion_config.yaml + fusion_provenance.json + README.md, then rename the temporary
       directory into place (a failure never leaves a half checkpoint)

Pushing the finished directory is a separate step (`hub.push_folder`), so a failed upload keeps the output.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoints import Checkpoint
from ..config import FusionConfig, NumberRule, check_numbers
from ..data import DataSource, encode_dataset, load_processor
from ..engine.compatibility import first_non_finite
from ..errors import DataSourceError, EmptyAlignmentDataError, FusionError, NonFiniteWeightsError
from ..hub.parents import (
    Parent,
    Preflight,
    download_parents,
    load_parent_model,
    parent_checkpoint,
    preflight,
    resolve_parent,
    sha256_file,
)
from ..output.provenance import CONFIG_FILE, Provenance, package_versions, reproduce_command, utc_now
from ..output.staging import StagedOutput, check_output_dir, stage_output

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FusePlan:
    """Pre-flight's answer: the pinned parents (and base), the resolved data sources, the anchor's plan."""

    preflight: Preflight
    base: Parent | None
    alignment_data: DataSource | None
    eval_data: DataSource | None

    def describe(self, config: FusionConfig, out: Path, push_to_hub: str | None) -> str:
        """Text for `--dry-run`: what would be downloaded, fused, written and pushed."""
        lines = [self.preflight.describe(config)]
        if self.base is not None:
            lines.append(f"Task-arithmetic base: {self.base.pinned}")
        for label, source in (("Alignment data", self.alignment_data), ("Evaluation data", self.eval_data)):
            if source is not None:
                pinned = f"{source.repo_id}@{source.commit}" if source.kind == "hub" else source.source
                cap = source.num_samples if source.num_samples is not None else "all"
                split = source.split or "none (a single saved Dataset)"
                lines.append(f"{label}: {pinned} ({source.kind}), split {split}, rows {cap}")
        lines.append(f"Output: {out}" + (f", then pushed to {push_to_hub}" if push_to_hub else ""))
        return "\n".join(lines)


@dataclass
class FuseJob:
    """One `otfusion-hub fuse` run; every field is a CLI option (see `otfusion-hub fuse --help`).

    Attributes:
        parents: Hub ids (`user/model[@revision]`) or local checkpoint directories, two or more.
        out: the output directory.
        config: the fusion's `FusionConfig`; `config.num_samples` also caps the alignment rows drawn.
        data / split / seed: alignment data source (Hub dataset id, `save_to_disk` dir, data dir or files), its
            split, and the seed of the row sample.
        text_column / image_column / label_column / max_length: how raw rows become model inputs.
        eval_data / eval_split / eval_num_samples: optional evaluation of parents, vanilla average and fused
            (`eval_split=None`: the only split, else `test`).
        device: where the statistics pass runs (`cpu`, `cuda`, `auto`); dtype: dtype of the saved weights.
        max_shard_size: shard `model.safetensors` (with an index) above this size, e.g. `"2GB"`.
        overwrite, allow_pickle, trust_remote_code: explicit permissions (all off by default).
        repo_id: where the model will be pushed (the usage snippet of the card loads from there).
        command: the command line, recorded in the provenance and the card.
        progress: progress bars.
    """

    parents: list[str]
    out: Path
    config: FusionConfig = field(default_factory=FusionConfig)
    data: str | None = None
    split: str | None = None
    seed: int = 0
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    max_length: int = 128
    eval_data: str | None = None
    eval_split: str | None = None
    eval_num_samples: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    repo_id: str | None = None
    command: str = ""
    progress: bool = True

    def check_output(self) -> Path:
        """The resolved `out`, once writing there destroys nothing (see `output_dir.check_output_dir`)."""
        inputs = [*self.parents, *(p for p in (self.config.base, self.data, self.eval_data) if p)]
        return check_output_dir(self.out, overwrite=self.overwrite, inputs=inputs)

    def check_options(self) -> None:
        """Raises `FusionError` (`DeviceUnavailableError` for the device) for a job option out of range or of the
        wrong type, so that it fails before any download rather than after the fusion."""
        from ..engine.distributed import resolve_device

        check_numbers(self, _JOB_NUMBERS)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FusionError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}.")
        parse_shard_size(self.max_shard_size)
        resolve_device(self.device)

    def plan(self) -> FusePlan:
        """Pre-flight: everything that can fail before a weight download (see `hub.preflight`)."""
        self.check_options()
        self.check_output()
        if self.config.needs_data and self.data is None:
            raise EmptyAlignmentDataError(
                f"This fusion ({', '.join(data_options(self.config))}) needs alignment data: pass --data (a Hub "
                "dataset id, a save_to_disk directory, a data directory or files), or drop those options and use "
                "--cost weights for a data-free fusion."
            )
        flags = dict(allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code)
        checked = preflight(self.parents, self.config, **flags)
        base = resolve_parent(self.config.base, **flags) if self.config.base else None
        alignment = None
        if self.data is not None and self.config.needs_data:
            alignment = DataSource.resolve(self.data, self.split, self.config.num_samples, self.seed)
            alignment.choose_split()  # a missing split fails now, and --dry-run shows the one used
        evaluation = None
        if self.eval_data is not None:
            from ..output.card import pipeline_and_auto_class

            task, _ = pipeline_and_auto_class(checked.plan.architecture, checked.plan.model_type)
            if task not in ("image-classification", "text-classification"):
                raise FusionError(
                    f"--eval-data scores classifiers, but the parents are {checked.plan.architecture} ({task}); "
                    "leave --eval-data out, or fuse classification checkpoints."
                )
            evaluation = DataSource.resolve(
                self.eval_data, self.eval_split, self.eval_num_samples, self.seed, default_split="test"
            )
            evaluation.choose_split()
        return FusePlan(preflight=checked, base=base, alignment_data=alignment, eval_data=evaluation)

    def run(self, plan: FusePlan | None = None):
        """Pre-flight (unless given), download, fuse, evaluate and write `out`; returns the `FusionResult`.

        Everything is written into a temporary sibling of `out`, renamed into place at the end, so a failure
        never leaves a half-written output. The result's model is the one written, loaded back from `out`.
        Under `torchrun` / `accelerate launch` every process fuses, but only the main one writes.
        """
        from ..engine.distributed import is_main_process, process_state
        from ..fusion import fuse_with_diagnostics

        plan = plan or self.plan()
        parents, anchor = plan.preflight.parents, plan.preflight.anchor
        download_parents([*parents, *([plan.base] if plan.base else [])], anchor, progress=self.progress)
        # checkpoints, not models: `fuse` loads each when its turn comes, holding two models at a time
        sources = [parent_checkpoint(p, trust_remote_code=self.trust_remote_code) for p in parents]
        base = load_parent_model(plan.base, trust_remote_code=self.trust_remote_code) if plan.base else None
        processor = None
        if parents[anchor].processor_files:
            processor = load_processor(parents[anchor].directory, trust_remote_code=self.trust_remote_code)
        label2id = sources[anchor].config().label2id
        alignment = self._encoded(plan.alignment_data, processor, label2id)
        result = fuse_with_diagnostics(
            sources, data=alignment, config=self.config, base=base, progress=self.progress, device=self.device
        )
        if not is_main_process(process_state(None)):
            return result  # under torchrun / accelerate launch, only the main process writes the output
        out = self.check_output()  # again: the fusion took a while
        with stage_output(out, overwrite=self.overwrite) as stage:  # swapped into place by `_finish`
            staging = stage.path
            if self.dtype is not None:
                result.model.to(DTYPES[self.dtype])
            check_fused_finite(result.model, self.dtype)  # a NaN model is never written, hence never pushed
            result.model.save_pretrained(staging, max_shard_size=self.max_shard_size)
            # the fused model is freed here: the steps below load it, and the parents, when they need them, so
            # that no step holds more than two models
            result.model = None
            fused = Checkpoint(str(staging), name="the fused model")
            evaluation = None
            if plan.eval_data is not None:
                evaluation = self._evaluate(plan, sources, fused, processor, label2id)
            from ..methods.readiness import readiness_report

            # the fusion's own maps when it aligned; the report solves data-free ones for unaligned methods
            own = FusionConfig(cost="weights", solver="exact", anchor=self.config.anchor)
            readiness = readiness_report(
                sources, config=self.config if result.maps else own, maps=result.maps or None, progress=self.progress
            )
            provenance = self._provenance(plan, result, evaluation)
            provenance.readiness = readiness.to_dict()
            self._finish(stage, parents[anchor], provenance)
        result.model = Checkpoint(str(out)).load()  # the weights as written (in `dtype`)
        return result

    # ------------------------------------------------------------------------------------------- steps
    def _encoded(self, source: DataSource | None, processor, label2id):
        if source is None:
            return None
        dataset = source.load()  # a missing split or file fails here, with its own message
        try:
            return encode_dataset(
                dataset, processor, text_column=self.text_column, image_column=self.image_column,
                label_column=self.label_column, max_length=self.max_length, label2id=label2id,
            )  # fmt: skip
        except DataSourceError as error:
            if processor is not None:
                raise
            raise DataSourceError(
                f"{error} The anchor ({self.parents[self.config.anchor]}) ships no tokenizer or image processor "
                "files, so give data that already holds model inputs."
            ) from error

    def _evaluate(self, plan: FusePlan, sources, fused, processor, label2id) -> dict[str, Any]:
        """Parents, vanilla average and fused model on the same evaluation rows.

        Every row's model is loaded (the fused one from the staged weights), or the vanilla average built, when
        the row is scored, and freed after it.
        """
        from ..engine.compatibility import same_widths
        from ..fusion import fuse_with_diagnostics
        from ..output.card import FUSED_ROW, VANILLA_ROW
        from ..train.evaluation import evaluate_models

        dataset = self._encoded(plan.eval_data, processor, label2id)
        if "labels" not in dataset.column_names:
            raise FusionError(f"--eval-data {self.eval_data} has no label column; name it with --label-column.")
        rows: dict[str, Any] = {}
        for k, (parent, source) in enumerate(zip(plan.preflight.parents, sources, strict=True)):
            rows[f"parent {k}: {parent.name}"] = source
        if self.config.method != "vanilla" and same_widths(plan.preflight.plans):  # other widths: no plain average
            vanilla = FusionConfig(method="vanilla", anchor=self.config.anchor, weights=self.config.weights)
            rows[VANILLA_ROW] = lambda: fuse_with_diagnostics(sources, config=vanilla, progress=False).model
        rows[FUSED_ROW] = fused
        return evaluate_models(rows, dataset, split=str(plan.eval_data.split), progress=self.progress).to_dict()

    def _provenance(self, plan: FusePlan, result, evaluation) -> Provenance:
        parents = plan.preflight.parents
        anchor_config = parents[plan.preflight.anchor].config
        data = plan.alignment_data.to_dict() if plan.alignment_data else None
        data_flags = {}
        if data is not None:
            data_flags = {"text_column": self.text_column, "image_column": self.image_column}
            if self.text_column or _is_text(anchor_config):
                data_flags["max_length"] = self.max_length
        options = {"dtype": self.dtype, "max_shard_size": self.max_shard_size}
        return Provenance(
            parents=[p.to_dict() for p in parents],
            anchor=plan.preflight.anchor,
            architecture=(anchor_config.get("architectures") or ["?"])[0],
            model_type=str(anchor_config.get("model_type")),
            config=self.config.to_dict(),
            base=plan.base.to_dict() if plan.base else None,
            alignment_data=data,
            eval_data=plan.eval_data.to_dict() if plan.eval_data else None,
            evaluation=evaluation,
            diagnostics=[_plain(d.to_dict()) for d in result.diagnostics],
            quality=_plain(quality_record(result)),
            timings={k: round(float(v), 3) for k, v in result.timings.items()},
            command=self.command,
            reproduce=reproduce_command(
                [p.pinned for p in parents],
                out=Path(self.out).name,
                base=plan.base.pinned if plan.base else None,
                data=data,
                data_flags=data_flags,
                options=options,
            ),  # fmt: skip
            options=options,
            versions=package_versions(),
            created=utc_now(),
        )

    def _finish(self, stage: StagedOutput, anchor: Parent, provenance: Provenance) -> None:
        """Completes the staging directory (which holds the weights) with processor, config, provenance and card,
        then swaps it into `out`; `stage_output` removes it on failure."""
        from ..output.card import render_card

        out, staging = Path(self.out), stage.path
        for name in anchor.processor_files:  # the anchor's tokenizer / image processor, byte for byte
            shutil.copyfile(anchor.directory / name, staging / name)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        provenance.outputs = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if _is_weight_file(p.name)}
        provenance.save(staging)
        card = render_card(provenance, repo_id=self.repo_id or str(out))
        card.save(staging / "README.md")
        stage.publish()


# the numeric job options that are not FusionConfig fields
_JOB_NUMBERS = {
    "seed": NumberRule(int, 0, 2**32 - 1),
    "max_length": NumberRule(int, 1),
    "eval_num_samples": NumberRule(int, 1, optional=True),
}
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_shard_size(size: str | int) -> int:
    """Bytes in a `max_shard_size` (`5GB`, `500MB`, or an int), the forms `save_pretrained` accepts.

    Raises:
        FusionError: anything else, or a size that is not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = size.strip() if isinstance(size, str) else ""
    try:
        value = float(text[:-2]) * _SIZE_UNITS[text[-2:].upper()]
    except (KeyError, ValueError):
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise FusionError(
            f"max_shard_size (--max-shard-size) {size!r} is not a size; write a positive number with a unit: 5GB, "
            "500MB, 200KB or 1TB."
        )
    return int(value)


def data_options(config: FusionConfig) -> list[str]:
    """The options of `config` that read alignment data, as `name=value` (`["cost=activations", "repair=all"]`)."""
    defaults = FusionConfig()
    needs = {
        "cost": config.cost == "activations" and (config.method == "ot" or config.align == "ot"),
        "method": config.method == "regmean",
        "repair": config.repair != defaults.repair,
        "residual": config.residual == "orthogonal",
        "within_heads": config.within_heads == "orthogonal",
        "refine_steps": config.refine_steps != defaults.refine_steps,
    }
    named = [f"{name}={getattr(config, name)}" for name, needed in needs.items() if needed]
    return named or [f"method={config.method}"]  # an option this table does not know yet: at least the method


def check_fused_finite(model, dtype: str | None = None) -> None:
    """Raises `NonFiniteWeightsError` naming the first fused tensor with NaN or inf (so nothing is written)."""
    name = first_non_finite(model.state_dict().items())
    if name is not None:
        cast = f" after the cast to {dtype}" if dtype else ""
        raise NonFiniteWeightsError(
            f"The fused model has NaN or infinite values in {name}{cast}; nothing was written. Check the parents, "
            "--weights and --scale" + (", or save in a wider --dtype." if dtype else "."),
            tensor=name,
        )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """FusionConfig fields from a YAML or JSON file (JSON is YAML); unknown keys fail in `FusionConfig.from_dict`."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FusionError(f"Cannot read the fusion config {path}: {error}") from error
    if not isinstance(values, dict):
        raise FusionError(f"{path} must hold a mapping of FusionConfig fields, not {type(values).__name__}.")
    return values


def silence_progress_bars() -> None:
    """Turns off the progress bars of huggingface_hub, datasets and transformers (for `-q`)."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def hide_weight_loading_bars() -> None:
    """Hides transformers' "Loading weights" bar, which every `from_pretrained` draws, keeping all other bars.

    A CLI run loads each parent several times (compatibility, fusion, evaluation, report): a bar per load buries
    the bars of the stages that take time. Downloads keep theirs, and `-q` still silences everything.
    """
    from transformers.utils import logging as transformers_logging

    if not hasattr(transformers_logging, "set_tqdm_hook"):  # older transformers: nothing to hook into
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)


def _is_weight_file(name: str) -> bool:
    """`model.safetensors`, its shards (`model-00001-of-00003.safetensors`) and their index."""
    return name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def _is_text(config: dict[str, Any]) -> bool:
    """Whether the model reads text (its alignment data is tokenised), from its spec's `modality`."""
    from ..engine.tasks import modality_of

    return modality_of(str(config.get("model_type"))) == "text"


def quality_record(result) -> dict:
    """What the quality options did in a `FusionResult`, for the provenance record and the card."""
    kinds: dict[str, set[str]] = {}
    for d in result.diagnostics:
        kinds.setdefault(d.space.split(".")[0], set()).add(d.kind)
    return {
        "map_kinds": {space: sorted(found) for space, found in kinds.items()},
        "repair": [site.to_dict() for site in result.repair],
        "refine": result.refine.to_dict() if result.refine is not None else None,
    }


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a diagnostics record (tuples to lists, numpy scalars to floats)."""
    return json.loads(json.dumps(record, default=float))
