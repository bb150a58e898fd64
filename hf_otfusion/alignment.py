"""`align_parents`: every parent re-expressed in the anchor's basis, function-preserving, for other merge tools.

`fuse` aligns each parent onto the anchor and then averages. This module stops before the average: it writes
every aligned parent as a normal checkpoint, so that mergekit (linear, TIES, SLERP, ...) or any other tool that
merges same-shaped checkpoints entry by entry can merge models that were trained independently.

The maps are `fuse`'s own (`fusion._solve_maps`, the step before its average); each parent is then moved with
them exactly as `fuse` moves it before averaging and repair (`methods.same_base.aligned_model` on
`fusion._fusion_parameters`). So averaging the aligned parents with
equal weights gives `fuse(method="ot")`'s parameters with the same config (with `refine_steps`, the refined
rotations; but with `refine_weights` or `refine_norms` the fused model also has learned weights or norms that no
aligned parent carries, so there the mean is the refined alignment's plain average, not the fused model).

Only exact maps keep a parent's function: permutations (the exact solver with uniform marginals and equal
widths), rotations (`residual="orthogonal"`, `within_heads="orthogonal"`) and the invertible value maps of
`refine_invertible`. Soft couplings (Sinkhorn,
importance marginals, `residual="mean"`, other widths, a target shape) blend units and are refused.

With rotations, every parent (the anchor too) is written with its LayerNorms folded into their readers and the
writers of the residual stream centred (`engine.reparameterise`), an exact rewrite, and its output norm set to
the anchor's (`restore_output_norm`, also exact): every output then shares one parameterisation, as the fused
model does. The anchor's own output is the anchor re-saved (after that rewrite when rotations were used).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import PreTrainedModel

from .checkpoints import Checkpoint, ModelOrPath, load_parent
from .config import FusionConfig
from .engine.compatibility import first_non_finite
from .engine.plan import resolve_plan
from .engine.reparameterise import output_norm_of, restore_output_norm
from .engine.spec import AlignmentSpec, load_spec
from .engine.transport import TransportMap
from .errors import FusionError, NonFiniteWeightsError

logger = logging.getLogger(__name__)

ALIGNMENT_CONFIG_FILE = "alignment_config.yaml"
CARD_TAGS = ("hf-otfusion", "optimal-transport", "aligned")
ORTHOGONALITY_TOLERANCE = 1e-6  # max |OᵀO − I| of a rotation that still counts as exact


@dataclass
class AlignedOutput:
    """How one aligned parent is named and described when written.

    Attributes:
        name: the sub-directory of `out` (`out/<name>/`) and the suffix of its Hub repo.
        label: how the card names the parent (a path, `repo@sha`, ...).
        repo_id: the parent's Hub repository, when it has one (the card's `base_model`).
        processor_dir / processor_files: tokenizer / image-processor files copied next to the weights.
    """

    name: str
    label: str
    repo_id: str | None = None
    processor_dir: Path | None = None
    processor_files: list[str] = field(default_factory=list)


@dataclass
class Alignment:
    """What `align_models` computed: the aligned parents, the maps that moved them and the config used."""

    models: list[PreTrainedModel]
    maps: dict[int, dict[str, TransportMap]]
    config: FusionConfig  # resolved: `residual` and `within_heads` are never "auto" here
    diagnostics: list  # fusion.SpaceDiagnostics, one per solved space and parent

    def map_kinds(self) -> dict[str, list[str]]:
        """Kinds of map per space family (`residual`, `heads`, `qk`, `vo`, `mlp`, ...), over all parents."""
        kinds: dict[str, set[str]] = {}
        for maps in self.maps.values():
            for space, transport in maps.items():
                kinds.setdefault(space.split(".")[0], set()).add(transport.kind)
        return {space: sorted(found) for space, found in sorted(kinds.items())}


def align_parents(
    parents: Sequence[ModelOrPath],
    config: FusionConfig | None = None,
    *,
    data=None,
    out: str | Path | None = None,
    overwrite: bool = False,
    names: list[str] | None = None,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> list[PreTrainedModel]:
    """Every parent re-expressed in the anchor's basis, computing exactly the function it computed before.

    Args:
        parents: two or more parents, as loaded models, checkpoints, local directories or Hub ids.
        config: the alignment choices (`FusionConfig`; `method` must stay `ot`). Defaults to `FusionConfig()`,
            whose activation cost needs `data`; pass `FusionConfig(cost="weights")` for a data-free alignment.
        data: alignment data for `cost="activations"`, as for `fuse`.
        out: when given, write `out/<name>/` for every parent (safetensors, config, the parent's processor
            files when it is a local directory, `alignment_config.yaml` and a model card). `out` is written
            through a staging directory and swapped into place (see `hf_otfusion.output.staging`).
        overwrite: replace a non-empty `out`.
        names: the sub-directory of each parent (default: the directory or repository name, `parent-K` for a
            model object; duplicates get their index appended).
        spec, progress, device: as for `fuse`.

    Returns:
        One model per parent, in the order given, of the parent's own class and config; the anchor's entry is
        the anchor itself (after the LayerNorm fold when the residual stream is rotated, see the module
        docstring). Averaging them with equal weights gives `fuse(parents, data, config)`'s parameters.

    Raises:
        FusionError: a config whose maps would not be exact (the message names the fix, e.g. `solver="exact"`),
            non-finite weights, or any error `fuse` raises for these parents.
    """
    outputs = [_describe(parent, k) for k, parent in enumerate(parents)]
    if names is not None:
        if len(names) != len(parents):
            raise FusionError(f"align_parents got {len(names)} names for {len(parents)} parents; give one each.")
        outputs = [replace(output, name=str(name)) for output, name in zip(outputs, names, strict=True)]
    outputs = unique_names(outputs)
    target = None
    if out is not None:
        from .output.staging import check_output_dir

        inputs = [str(p.location if isinstance(p, Checkpoint) else p) for p in parents if not _is_model(p)]
        target = check_output_dir(out, overwrite=overwrite, inputs=inputs, flag="out")
    alignment = align_models(parents, config, data=data, spec=spec, progress=progress, device=device)
    if target is not None and _main_process():  # under torchrun / accelerate launch, the main process writes
        write_aligned(alignment, outputs, target, overwrite=overwrite)
    return alignment.models


def check_exact_config(config: FusionConfig) -> None:
    """Refuses the options whose maps blend units (not function-preserving), naming the option that fixes it."""
    problems = []
    if config.method != "ot":
        problems.append(f"method={config.method!r} merges the parents; aligning needs method='ot' (drop --method)")
    if config.target is not None:
        problems.append("target= compresses the anchor into another shape; drop --target (aligned parents keep it)")
    if config.solver != "exact":
        problems.append(f"solver={config.solver!r} gives soft couplings; use --solver exact (solver='exact')")
    if config.marginals != "uniform":
        problems.append(
            f"marginals={config.marginals!r} gives uneven couplings; use --marginals uniform (marginals='uniform')"
        )
    if config.residual == "mean":
        problems.append(
            "residual='mean' averages several permutations into a soft map; use --residual shared, or orthogonal / "
            "auto for ViT and DeiT with --data"
        )
    if config.heads != "aware":
        problems.append(f"heads={config.heads!r} matches dims across heads, which changes attention; use --heads aware")
    if config.repair != "none":
        problems.append(f"repair={config.repair!r} corrects the fused model only; drop --repair (repair='none')")
    if problems:
        raise FusionError(
            "Aligned parents must keep their function, so every map must be a permutation or a rotation: "
            + "; ".join(problems)
            + "."
        )


def check_exact_maps(maps: dict[int, dict[str, TransportMap]]) -> None:
    """Raises `FusionError` for the first map that is not a square permutation or rotation (function-preserving)."""
    for k, spaces in sorted(maps.items()):
        for space, transport in spaces.items():
            n_a, n_b = transport.shape
            exact = n_a == n_b and transport.output_scale == 1.0
            if exact and transport.kind == "orthogonal":
                matrix = transport.output_matrix()
                error = np.abs(matrix.T @ matrix - np.eye(n_b)).max()
                if error > ORTHOGONALITY_TOLERANCE:
                    raise FusionError(
                        f"Parent {k}'s rotation of space {space} is orthogonal only to {error:.1e} (max |OᵀO − I|, "
                        f"exact means <= {ORTHOGONALITY_TOLERANCE:g}): moving the parent with it would change what "
                        "the parent computes. Report this with the config; it is a bug in the solve, not your input."
                    )
            elif exact and transport.kind == "invertible":  # readers take the inverse transpose: W' x' = W x
                error = np.abs(transport.input_matrix().T @ transport.output_matrix() - np.eye(n_b)).max()
                exact = bool(error <= ORTHOGONALITY_TOLERANCE)
            elif exact:
                exact = transport.kind == "permutation"
            if not exact:
                widths = f"{n_a} parent units onto {n_b} anchor units"
                fix = (
                    "align parents of the anchor's widths"
                    if n_a != n_b
                    else "use --solver exact and --marginals uniform (solver='exact', marginals='uniform')"
                )
                raise FusionError(
                    f"Parent {k}'s map of space {space} is a soft {transport.kind} ({widths}): moving the parent with "
                    f"it would change what the parent computes. Only permutations and rotations are function-"
                    f"preserving; {fix}."
                )


def align_models(
    parents: Sequence[ModelOrPath],
    config: FusionConfig | None = None,
    *,
    data=None,
    spec: AlignmentSpec | str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Alignment:
    """The aligned parents with the maps and the resolved config (see `align_parents`, which writes them).

    Costs what `fuse_with_diagnostics` spends before it averages (its checks, statistics pass, solves and
    refinement: the same maps) plus one more load of each parent given as a checkpoint; every aligned parent
    is then held in memory.
    """
    from .fusion import _fusion_parameters, _planned_run, _solve_maps
    from .methods.same_base import aligned_model

    config = config or FusionConfig()
    check_exact_config(config)
    if isinstance(spec, str | Path):
        spec = load_spec(spec)
    # `fuse`'s own checks, plan, statistics pass and solves, without its average
    result = _solve_maps(_planned_run(parents, data, config, spec=spec, progress=progress, device=device))
    result.model = None  # type: ignore[assignment]  # the anchor as given: each parent is loaded again below
    resolved, anchor = result.config, config.anchor
    check_exact_maps(result.maps)
    rotated = resolved.residual == "orthogonal"

    anchor_model = load_parent(parents[anchor])
    anchor_plan = resolve_plan(anchor_model, spec)
    # fuse gives the fused model the anchor's output norm: so do we
    anchor_norm = output_norm_of(anchor_model, anchor_plan) if rotated else None
    models = []
    for k, source in enumerate(parents):
        parent = anchor_model if k == anchor else load_parent(source)
        plan = anchor_plan if k == anchor else resolve_plan(parent, spec)
        aligned = aligned_model(parent, _fusion_parameters(parent, plan, resolved), plan, result.maps.get(k, {}))
        if anchor_norm is not None:
            restore_output_norm(aligned, plan, *anchor_norm)
        name = first_non_finite(aligned.named_parameters())
        if name is not None:
            raise NonFiniteWeightsError(
                f"Aligned parent {k} has NaN or infinite values in {name}; nothing was written. Check the parent.",
                tensor=name,
            )
        models.append(aligned.eval())
        del parent
    return Alignment(models=models, maps=result.maps, config=resolved, diagnostics=result.diagnostics)


def write_aligned(alignment: Alignment, outputs: list[AlignedOutput], target: Path, *, overwrite: bool = False) -> Path:
    """Writes `target/<name>/` for every aligned parent through one staging directory swapped into place.

    `target` is the path `output.staging.check_output_dir` returned.
    """
    from .output.staging import stage_output

    with stage_output(target, overwrite=overwrite) as stage:
        for k, (model, output) in enumerate(zip(alignment.models, outputs, strict=True)):
            folder = stage.path / output.name
            model.save_pretrained(folder)  # safetensors
            source = output.processor_dir
            if source is not None:
                for name in output.processor_files:
                    shutil.copyfile(source / name, folder / name)
            (folder / ALIGNMENT_CONFIG_FILE).write_text(yaml.safe_dump(alignment.config.to_dict(), sort_keys=False))
            card = aligned_card(alignment, outputs, k)
            card.save(folder / "README.md")
        stage.publish()
    logger.info("aligned parents written to %s: %s", target, ", ".join(o.name for o in outputs))
    return target


def aligned_card(alignment: Alignment, outputs: list[AlignedOutput], index: int):
    """The model card of aligned parent `index`: what it is, its maps, why it keeps its function, how to merge."""
    from huggingface_hub import ModelCard, ModelCardData

    from .output.card import pipeline_and_auto_class, usage_section

    model, output = alignment.models[index], outputs[index]
    anchor = alignment.config.anchor
    architecture = type(model).__name__
    pipeline_tag, auto_class = pipeline_and_auto_class(architecture, model.config.model_type)
    data = ModelCardData(
        model_name=f"{output.name} aligned onto {outputs[anchor].name}" if index != anchor else output.name,
        base_model=output.repo_id,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*CARD_TAGS, model.config.model_type],
    )
    kinds = _kinds(alignment.maps.get(index, {}))
    rotated = alignment.config.residual == "orthogonal"
    if index == anchor:
        what = (
            f"This is the anchor, **{output.label}**, re-saved by hf_otfusion so that it shares one "
            "parameterisation with the other aligned parents"
            + (
                ": its LayerNorms are folded into the layers that read them and the writers of the residual stream "
                "are centred (an exact rewrite, see `hf_otfusion.engine.reparameterise`); its output norm holds its "
                "own weights again."
                if rotated
                else "; its weights are unchanged (no map moves the anchor)."
            )
        )
    else:
        what = (
            f"This is **{output.label}** re-expressed in the basis of the anchor **{outputs[anchor].label}** by "
            "hf_otfusion: its neurons and attention heads are permuted"
            + (" and its residual stream rotated" if rotated else "")
            + " onto the anchor's by optimal-transport alignment"
            + (
                ", after its LayerNorms were folded into their readers (an exact rewrite); its output norm holds "
                "the anchor's weights, its readers compensating exactly."
                if rotated
                else "."
            )
        )
    title = f"{output.name}, aligned onto {outputs[anchor].name}" if index != anchor else f"{output.name} (the anchor)"
    everyone = {space: ", ".join(found) for space, found in alignment.map_kinds().items()}
    rows = "\n".join(f"| {space} | {kinds.get(space, 'identity')} | {found} |" for space, found in everyone.items())
    siblings = [o.name for o in outputs]
    recipe = mergekit_recipe(siblings, anchor)
    config_yaml = yaml.safe_dump(alignment.config.to_dict(), sort_keys=False).strip()
    body = f"""
# {title}

{what}

**Function-preserving.** Every map is a permutation or a rotation, so this checkpoint computes the same outputs
as the original parent (up to float rounding). Its weights, however, now line up unit for unit with the anchor's
and with the other parents aligned in the same run ({", ".join(siblings)}), so merge tools that average or
combine checkpoints entry by entry (mergekit, task arithmetic, TIES, SLERP) can merge independently trained
models. Averaging all of them with equal weights gives `hf_otfusion.fuse(method="ot")` with this config.

## Maps

Which kinds of map moved each family of spaces (`identity`: not moved; the anchor is never moved):

| space | this checkpoint | all parents of the run |
|---|---|---|
{rows or "| (none) | identity | identity |"}

## Alignment config

```yaml
{config_yaml}
```

## Merging with mergekit

Save as `config.yml` in the directory that holds the aligned directories and run `mergekit-yaml config.yml
merged/` there (`merge_method: ties` or `slerp` work the same way on these directories):

```yaml
{recipe}
```

{usage_section(auto_class, output.name)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def mergekit_recipe(names: list[str], anchor: int = 0, method: str = "linear") -> str:
    """A mergekit YAML config merging the aligned directories `names` (equal weights; `linear`, `ties`, `slerp`)."""
    if method == "slerp":
        first, second = (names + names)[:2]
        return (
            f"merge_method: slerp\nbase_model: {names[anchor]}\nmodels:\n  - model: {first}\n  - model: {second}\n"
            "parameters:\n  t: 0.5\ndtype: float32"
        )
    models = "\n".join(f"  - model: {name}\n    parameters:\n      weight: 1.0" for name in names)
    return f"merge_method: {method}\nmodels:\n{models}\ndtype: float32"


def unique_names(outputs: list[AlignedOutput]) -> list[AlignedOutput]:
    """`outputs` with duplicate names (`a`, `a`) made unique by their index (`a-0`, `a-1`), and safe as folders."""
    cleaned = [replace(o, name=_folder_name(o.name)) for o in outputs]
    counts: dict[str, int] = {}
    for o in cleaned:
        counts[o.name] = counts.get(o.name, 0) + 1
    return [replace(o, name=f"{o.name}-{k}") if counts[o.name] > 1 else o for k, o in enumerate(cleaned)]


def _folder_name(name: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-")
    return name or "parent"


def _kinds(maps: dict[str, TransportMap]) -> dict[str, str]:
    kinds: dict[str, set[str]] = {}
    for space, transport in maps.items():
        kinds.setdefault(space.split(".")[0], set()).add(transport.kind)
    return {space: ", ".join(sorted(found)) for space, found in sorted(kinds.items())}


def _main_process() -> bool:
    from .engine.distributed import is_main_process, process_state

    return is_main_process(process_state(None))


def _is_model(parent: Any) -> bool:
    return isinstance(parent, PreTrainedModel)


def _describe(parent: ModelOrPath, index: int) -> AlignedOutput:
    """The default name, label, Hub id and processor files of a parent given to `align_parents`."""
    from .data import is_repo_id
    from .hub.parents import PROCESSOR_FILES

    if _is_model(parent):
        source = str(getattr(parent, "name_or_path", "") or "")
        name = Path(source).name if source else f"parent-{index}"
        return AlignedOutput(name=name or f"parent-{index}", label=source or f"parent {index} (a model object)")
    location = str(parent.location if isinstance(parent, Checkpoint) else parent)
    path = Path(location).expanduser()
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name in PROCESSOR_FILES)
        return AlignedOutput(name=path.resolve().name, label=location, processor_dir=path, processor_files=files)
    repo_id = location.partition("@")[0]
    return AlignedOutput(
        name=repo_id.rsplit("/", 1)[-1], label=location, repo_id=repo_id if is_repo_id(repo_id) else None
    )
