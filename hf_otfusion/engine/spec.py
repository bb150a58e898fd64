"""Alignment specs: per-`model_type` data that binds every parameter axis to a space of interchangeable units.

A spec is the only place that knows an architecture. It is a YAML file (see `specs/bert.yaml`) validated
strictly into the frozen dataclasses below: unknown keys, undeclared spaces and malformed axis entries fail
with a `SpecError` naming the entry. Adding an architecture means adding a spec file.

Keys (required unless marked optional):

- `model_type`: the `config.model_type` the spec is for; the file is `specs/<model_type>.yaml`.
- `architectures`: the model classes it covers (each must have its every parameter bound).
- `modality`: `text` or `image`, what the model reads. It decides the Hub pipeline tag of a bare encoder
  (`feature-extraction` or `image-feature-extraction`) and whether alignment data is tokenised (`max_length`).
  The task of a head class (pipeline tag, Auto class, classifier or not) is not in the spec: it comes from
  transformers' own `MODEL_FOR_*_MAPPING_NAMES` tables (`hf_otfusion.engine.tasks`).
- `layers`: the config key holding the number of layers; `{i}` in any name below runs over them. The
  parameters bound by a `{i}` pattern are the layers' parameters (the per-layer groups of the readiness report);
  the other parameters are the embeddings (before the first layer) or the head (after the last).
- `spaces`: name -> `{size, heads?, stream?, scaled_dot_product?}` (see `SpaceSpec`), in flow order. The
  order also lists the kinds of space (the name before `.{i}`) in the model card's diagnostics table.
- `parameters`: parameter name pattern -> one entry per axis: a space name (the axis holds its units), `in:SPACE`
  (the axis reads them) or null (not aligned). `{base}` is the base-model prefix, empty in the bare model.
- `hooks`: space -> the modules whose outputs are that space's units (activation costs and statistics).
- `residual_norms` (optional, pre-LN only): norm -> the modules that read its output.
- `output_norm` (optional): the residual norm whose output is the encoder's output.
- `repair` (optional): module -> the parameter that takes the shift when its output statistics are restored.

Patterns naming a module or parameter the model lacks (a pooler, a second head) are skipped for that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError, UnsupportedArchitectureError

LAYER = "{i}"
BASE = "{base}"
_INPUT_PREFIX = "in:"
_TOP_KEYS = {"model_type", "architectures", "modality", "layers", "spaces", "parameters", "hooks"}
MODALITIES = ("image", "text")
_OPTIONAL_KEYS = {"residual_norms", "output_norm", "repair"}
_SPACE_KEYS = {"size", "heads", "stream", "scaled_dot_product"}


@dataclass(frozen=True)
class SpaceSpec:
    """A set of interchangeable units, possibly one per layer (`{i}` in the name).

    `size` names the config key giving the number of units. `heads` names the space of attention heads this
    space is nested in (its units are `heads x d_head`, head-major). `stream` marks a residual stream: many
    modules write to it, and the residual policy decides how their costs combine. `scaled_dot_product` marks
    the query/key space: its units are summed in the attention logits Q·Kᵀ/√d_head, so fusing heads of
    another size must also keep the logits' scale (see `TransportMap.output_scale`).
    """

    name: str
    size: str
    heads: str | None = None
    stream: bool = False
    scaled_dot_product: bool = False


@dataclass(frozen=True)
class AxisBinding:
    """One parameter axis bound to a space; `reads` is True for weight columns that take the unit as input."""

    space: str
    reads: bool = False

    @classmethod
    def parse(cls, entry: str) -> AxisBinding:
        if entry.startswith(_INPUT_PREFIX):
            return cls(entry[len(_INPUT_PREFIX) :], reads=True)
        return cls(entry)

    def format(self, layer: int | None = None) -> AxisBinding:
        return AxisBinding(_expand(self.space, layer), self.reads)


@dataclass(frozen=True)
class AlignmentSpec:
    """The validated content of one spec file.

    Optional sections describe what the quality options need to know of an architecture:
    `residual_norms` maps each normalisation that reads the residual stream to the modules that read its
    output (present only for pre-LN architectures, whose residual stream can then be rotated: see
    `hf_otfusion.engine.reparameterise`); `output_norm` names the one whose output is the encoder's output
    (`last_hidden_state`), which gets the anchor's own weight and bias back after fusion; `repair` maps each
    module whose output statistics are restored after averaging to the parameter that takes the shift (its
    bias, or the position embeddings of an embedding module: see `hf_otfusion.engine.repair`).
    """

    model_type: str
    architectures: tuple[str, ...]
    modality: str
    layers: str
    spaces: tuple[SpaceSpec, ...]
    parameters: dict[str, tuple[AxisBinding | None, ...]]
    hooks: dict[str, tuple[str, ...]]
    residual_norms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    output_norm: str | None = None
    repair: dict[str, str] = field(default_factory=dict)

    @property
    def space_kinds(self) -> tuple[str, ...]:
        """The kinds of space (`residual`, `heads`, `qk`, ...: names without their layer), in declaration order."""
        return tuple(dict.fromkeys(space.name.split(".")[0] for space in self.spaces))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> AlignmentSpec:
        """Validates a parsed spec file; every problem names the offending entry."""
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: a spec must be a mapping, got {type(raw).__name__}.", spec=source)
        _reject_unknown(raw, _TOP_KEYS | _OPTIONAL_KEYS, source)
        missing = sorted(_TOP_KEYS - set(raw))
        if missing:
            raise SpecError(f"{source}: missing key(s) {missing}.", spec=source, key=missing[0])
        if raw["modality"] not in MODALITIES:
            raise SpecError(
                f"{source}: modality must be one of {list(MODALITIES)} (what the model reads), "
                f"got {raw['modality']!r}.",
                spec=source,
                key="modality",
            )

        spaces = []
        for name, body in raw["spaces"].items():
            body = body or {}
            _reject_unknown(body, _SPACE_KEYS, f"{source}: space {name!r}", source)
            if "size" not in body:
                raise SpecError(f"{source}: space {name!r} needs a `size` (a config key).", spec=source, key=name)
            spaces.append(
                SpaceSpec(
                    name,
                    body["size"],
                    body.get("heads"),
                    bool(body.get("stream", False)),
                    bool(body.get("scaled_dot_product", False)),
                )
            )
        declared = {s.name for s in spaces}
        for space in spaces:
            if space.heads is not None and space.heads not in declared:
                raise SpecError(
                    f"{source}: space {space.name!r} nests in undeclared heads space {space.heads!r}.",
                    spec=source,
                    key=space.name,
                )
            if space.scaled_dot_product and space.heads is None:
                raise SpecError(
                    f"{source}: space {space.name!r} is a scaled dot product, so it needs `heads`.",
                    spec=source,
                    key=space.name,
                )

        parameters: dict[str, tuple[AxisBinding | None, ...]] = {}
        for pattern, axes in raw["parameters"].items():
            if not isinstance(axes, list):
                raise SpecError(
                    f"{source}: parameter {pattern!r} needs a list of axis entries, got {axes!r}.",
                    spec=source,
                    key=pattern,
                )
            bindings = tuple(None if axis is None else AxisBinding.parse(str(axis)) for axis in axes)
            for binding in bindings:
                if binding is not None and binding.space not in declared:
                    raise SpecError(
                        f"{source}: parameter {pattern!r} binds an axis to undeclared space {binding.space!r}; "
                        f"declared spaces are {sorted(declared)}.",
                        spec=source,
                        key=pattern,
                    )
            parameters[pattern] = bindings

        hooks: dict[str, tuple[str, ...]] = {}
        for space_name, modules in raw["hooks"].items():
            if space_name not in declared:
                raise SpecError(
                    f"{source}: hooks given for undeclared space {space_name!r}.", spec=source, key=space_name
                )
            hooks[space_name] = tuple(modules)

        residual_norms: dict[str, tuple[str, ...]] = {}
        for norm, readers in (raw.get("residual_norms") or {}).items():
            if not isinstance(readers, list) or not readers:
                raise SpecError(
                    f"{source}: residual norm {norm!r} needs a non-empty list of the modules that read it.",
                    spec=source,
                    key=str(norm),
                )
            residual_norms[str(norm)] = tuple(str(reader) for reader in readers)
        repair: dict[str, str] = {}
        for module, shift in (raw.get("repair") or {}).items():
            if not isinstance(shift, str) or not shift.startswith(str(module) + "."):
                raise SpecError(
                    f"{source}: repair site {module!r} needs the name of one of its own parameters that takes the "
                    f"shift (e.g. {str(module) + '.bias'!r}), got {shift!r}.",
                    spec=source,
                    key=str(module),
                )
            repair[str(module)] = shift

        return cls(
            model_type=str(raw["model_type"]),
            architectures=tuple(raw["architectures"]),
            modality=str(raw["modality"]),
            layers=str(raw["layers"]),
            spaces=tuple(spaces),
            parameters=parameters,
            hooks=hooks,
            residual_norms=residual_norms,
            output_norm=_output_norm(raw.get("output_norm"), residual_norms, source),
            repair=repair,
        )


def available_specs() -> list[str]:
    """The `model_type`s that ship with a spec."""
    folder = resources.files("hf_otfusion.engine") / "specs"
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_spec(model_type_or_path: str | Path) -> AlignmentSpec:
    """Loads the shipped spec for a `model_type`, or a spec file given by path.

    Raises:
        UnsupportedArchitectureError: no spec ships for that `model_type`.
        SpecError: the file is malformed.
    """
    path = Path(model_type_or_path)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        text, source = path.read_text(), str(path)
    else:
        name = str(model_type_or_path)
        resource = resources.files("hf_otfusion.engine") / "specs" / f"{name}.yaml"
        if not resource.is_file():
            raise UnsupportedArchitectureError(
                f"No alignment spec for model_type {name!r}. Shipped specs: {available_specs()}. "
                "To add an architecture, write a spec file (see hf_otfusion/engine/specs/bert.yaml) and pass its path.",
                model_type=name,
            )
        text, source = resource.read_text(), f"specs/{name}.yaml"
    return AlignmentSpec.from_dict(yaml.safe_load(text), source)


def _expand(template: str, layer: int | None) -> str:
    if LAYER in template:
        if layer is None:
            raise SpecError(f"{template!r} uses {LAYER} outside a per-layer context.", key=template)
        return template.replace(LAYER, str(layer))
    return template


def _reject_unknown(mapping: dict[str, Any], allowed: set[str], where: str, spec: str | None = None) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}.",
            spec=spec if spec is not None else where,
            key=unknown[0],
        )


def _output_norm(value: Any, residual_norms: dict[str, tuple[str, ...]], source: str) -> str | None:
    if value is None:
        return None
    if str(value) not in residual_norms:
        raise SpecError(
            f"{source}: output_norm {value!r} must be one of the residual_norms {sorted(residual_norms)}.",
            spec=source,
            key=str(value),
        )
    return str(value)
