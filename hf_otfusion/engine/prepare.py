"""The one set-up step before any alignment: parents counted, anchor checked, spec loaded, plans resolved.

`fuse`, `readiness_report` and the CLI's pre-flight all start from the same question: can these parents be
aligned onto this anchor, and how does each map onto the spec's spaces? `prepare` answers it once, on loaded
models or on weightless skeletons (built on the meta device from configs), so a pre-flight that has read only
configs and a fusion that holds the weights raise the same errors with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from ..config import FusionConfig
from ..errors import FusionError, InvalidConfigError
from .compatibility import check_compatible, check_same_model_type, check_same_widths
from .plan import FusionPlan, resolve_plan
from .spec import AlignmentSpec, load_spec


@dataclass
class PreparedParents:
    """Parents that can be aligned onto the anchor, each with its resolved plan.

    Attributes:
        models: the parents as given to `prepare`: loaded models or weightless skeletons.
        plans: each parent's resolved plan (how its parameter axes bind to the spec's spaces).
        anchor: index of the parent whose basis, class and config the result takes.
        weights: each parent's normalised averaging weight (`FusionConfig.normalised_weights`).
        spec: the spec the plans were resolved with; `None` when each plan took its `model_type`'s shipped spec.
    """

    models: list[PreTrainedModel]
    plans: list[FusionPlan]
    anchor: int
    weights: list[float]
    spec: AlignmentSpec | None

    @property
    def anchor_plan(self) -> FusionPlan:
        """The anchor's plan: the fused model's shape."""
        return self.plans[self.anchor]

    def resolved(self, config: FusionConfig) -> FusionConfig:
        """`config` with its `auto` choices decided for these parents (`FusionConfig.resolved`): rotations where
        every plan's norms allow them and every space has the anchor's width (rotations need square maps)."""
        sizes = {name: space.size for name, space in self.anchor_plan.spaces.items()}
        equal_widths = all({name: space.size for name, space in plan.spaces.items()} == sizes for plan in self.plans)
        return config.resolved(all(plan.residual_norms for plan in self.plans), equal_widths)


def check_parent_count(count: int, config: FusionConfig) -> list[float]:
    """The normalised parent weights, once `count` parents and `config.anchor` and `config.weights` agree.

    Separate from `prepare` so that the pre-flight can fail on a bad count before it contacts the Hub.

    Raises:
        FusionError: fewer than 2 parents, an anchor out of range, or a wrong number of weights.
    """
    if count < 2:
        raise FusionError(f"Fusion needs at least 2 parents, got {count}.")
    if not 0 <= config.anchor < count:
        raise InvalidConfigError(
            f"FusionConfig.anchor={config.anchor} is out of range for {count} parents.",
            field="anchor",
            value=config.anchor,
        )
    return config.normalised_weights(count)


def prepare(
    models: list[PreTrainedModel], config: FusionConfig, spec: AlignmentSpec | str | Path | None = None
) -> PreparedParents:
    """Checks that `models` can be aligned onto `config.anchor` and resolves every parent's plan.

    Args:
        models: the parents, loaded or as weightless skeletons (`checkpoints.skeleton`); nothing here reads a
            weight value, so skeletons give the same answer as the loaded models.
        config: supplies the anchor and the parent weights.
        spec: an alignment spec (object, shipped `model_type` name or YAML path); default: the spec of the
            parents' `model_type`.

    Raises:
        FusionError: the count, anchor or weights are wrong (`check_parent_count`); `ModelTypeMismatchError`,
            `UnsupportedArchitectureError`, `UncoveredParameterError` or another `IncompatibleModelsError`
            naming the parent and the fix, among them other widths under a method that averages tensors as
            they are (`vanilla`, or a same-base method without `align="ot"`).
    """
    weights = check_parent_count(len(models), config)
    check_same_model_type(models)  # before the spec: a mixed pair is named as such, not as a spec problem
    if isinstance(spec, str | Path):
        spec = load_spec(spec)
    plans = [resolve_plan(model, spec) for model in models]
    check_compatible(models, plans, config.anchor)
    if config.method != "ot" and config.align != "ot":  # OT, and aligned same-base methods, take any widths
        check_same_widths(plans, config.anchor, config.method)
    return PreparedParents(models=list(models), plans=plans, anchor=config.anchor, weights=weights, spec=spec)
