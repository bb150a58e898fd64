"""Resolving a spec on a concrete model: which spaces exist, which axes they bind, which modules to hook.

The result, a `FusionPlan`, is what every later step works from; the engine never looks at the spec again.
Resolution checks that every parameter is covered exactly once and that every bound axis has its space's
size, so that a spec that drifted from transformers fails loudly instead of fusing the wrong tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..errors import SpecError, UncoveredParameterError, UnsupportedArchitectureError
from .spec import BASE, LAYER, AlignmentSpec, AxisBinding, SpaceSpec, load_spec


@dataclass(frozen=True)
class Space:
    """A resolved space: `size` units; nested spaces know their heads space and head count."""

    name: str
    size: int
    heads: str | None = None
    num_heads: int | None = None
    stream: bool = False
    scaled_dot_product: bool = False

    @property
    def head_dim(self) -> int:
        assert self.num_heads is not None, f"{self.name} is not nested in heads"
        return self.size // self.num_heads


@dataclass
class FusionPlan:
    """The spec resolved on one model: spaces in flow order, axis bindings per parameter, hook modules."""

    model_type: str
    architecture: str
    num_layers: int
    spaces: dict[str, Space]
    parameters: dict[str, tuple[AxisBinding | None, ...]]
    hooks: dict[str, list[str]] = field(default_factory=dict)
    residual_norms: dict[str, list[str]] = field(default_factory=dict)  # norm module -> modules reading it
    output_norm: str | None = None  # the residual norm whose output is the encoder's output
    repair_sites: dict[str, str] = field(default_factory=dict)  # module -> the parameter taking the shift
    layers: dict[str, int] = field(default_factory=dict)  # parameter -> its layer, for those bound by a `{i}` pattern

    def parameter_group(self, name: str) -> str:
        """`layer i` for a parameter of layer i, else `embeddings` (before the first layer) or `head` (after it)."""
        if name in self.layers:
            return f"layer {self.layers[name]}"
        first = next((param for param in self.parameters if param in self.layers), None)
        names = list(self.parameters)
        return "embeddings" if first is None or names.index(name) < names.index(first) else "head"

    @property
    def stream(self) -> str | None:
        """The residual-stream space, if the spec declares one."""
        return next((name for name, space in self.spaces.items() if space.stream), None)

    def parameters_of(self, space: str) -> list[str]:
        """Names of the parameters with at least one axis in `space`, in model order."""
        return [
            name
            for name, axes in self.parameters.items()
            if any(axis is not None and axis.space == space for axis in axes)
        ]

    def nested_in(self, heads_space: str) -> list[Space]:
        """The spaces whose units are (head, dim) pairs of `heads_space`."""
        return [space for space in self.spaces.values() if space.heads == heads_space]


def named_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A model's parameters by name, detached: the tensors whose axes a plan binds to spaces."""
    return {name: param.detach() for name, param in model.named_parameters()}


def model_with_tensors(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A deep copy of `model` whose parameters hold `tensors` (by name, cast to each parameter's dtype)."""
    result = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in result.named_parameters():
            param.copy_(tensors[name].to(param.dtype))
    return result


def base_prefix(model: PreTrainedModel) -> str:
    """`"bert."` inside head models such as BertForSequenceClassification, `""` for the bare BertModel."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module):
        return prefix + "."
    return ""


def resolve_plan(model: PreTrainedModel, spec: AlignmentSpec | None = None) -> FusionPlan:
    """Binds the spec of `model.config.model_type` (or `spec`) to the model's parameters and modules.

    Raises:
        UnsupportedArchitectureError: no spec for the model type, or the spec does not list this class.
        UncoveredParameterError: a parameter that no spec entry binds, or that two entries bind.
        SpecError: a bound axis whose size differs from its space's size.
    """
    config = model.config
    spec = spec or load_spec(config.model_type)
    architecture = type(model).__name__
    if architecture not in spec.architectures:
        raise UnsupportedArchitectureError(
            f"{architecture} is not covered by the {spec.model_type!r} alignment spec, which supports "
            f"{list(spec.architectures)}. Load the checkpoint as one of those classes, or add the class and "
            "its extra parameters to the spec.",
            model_type=spec.model_type,
            architecture=architecture,
        )
    num_layers = _config_int(config, spec.layers, "layers")
    base = base_prefix(model)

    bound, layer_of = _expand_parameters(spec, base, num_layers)
    params = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    uncovered = [name for name in params if name not in bound]
    if uncovered:
        raise UncoveredParameterError(
            f"The {spec.model_type!r} spec does not bind parameter(s) {uncovered[:5]} of {architecture}"
            f"{' (and more)' if len(uncovered) > 5 else ''}. Add an entry for each to the spec's `parameters`.",
            parameters=uncovered,
        )
    parameters = {name: bound[name] for name in params}

    spaces = _expand_spaces(spec, config, num_layers)
    used = {axis.space for axes in parameters.values() for axis in axes if axis is not None}
    used |= {spaces[name].heads for name in used if spaces[name].heads}
    spaces = {name: space for name, space in spaces.items() if name in used}

    for name, axes in parameters.items():
        tensor = params[name]
        if len(axes) != tensor.ndim:
            raise SpecError(
                f"Spec gives {len(axes)} axes for {name}, which has shape {tuple(tensor.shape)}.",
                spec=spec.model_type,
                key=name,
            )
        for dim, axis in enumerate(axes):
            if axis is not None and tensor.shape[dim] != spaces[axis.space].size:
                raise SpecError(
                    f"{name} axis {dim} has {tensor.shape[dim]} units but space {axis.space!r} has "
                    f"{spaces[axis.space].size}; fix the space's `size` key or the axis binding in the spec.",
                    spec=spec.model_type,
                    key=name,
                )

    modules = dict(model.named_modules())
    hooks = {}
    for space_template, module_templates in spec.hooks.items():
        for layer in _layers_of(space_template, num_layers):
            space = space_template.replace(LAYER, str(layer)) if layer is not None else space_template
            if space not in spaces:
                continue
            names = []
            for template in module_templates:
                for module_layer in _layers_of(template, num_layers) if layer is None else [layer]:
                    name = _fill(template, base, module_layer)
                    if name in modules:
                        names.append(name)
            if names:
                hooks[space] = names
    residual_norms = {
        norm: [reader for template in readers for reader in _present(template, base, layer, modules)]
        for norm_template, readers in spec.residual_norms.items()
        for layer in _layers_of(norm_template, num_layers)
        for norm in _present(norm_template, base, layer, modules)
    }
    listed = {
        module: _fill(shift, base, layer)
        for template, shift in spec.repair.items()
        for layer in _layers_of(template, num_layers)
        for module in _present(template, base, layer, modules)
    }
    repair_sites = {name: listed[name] for name in modules if name in listed}  # flow order: the model's own
    for module, shift in repair_sites.items():
        if shift not in parameters:
            raise SpecError(
                f"Repair site {module} shifts {shift}, which is not a parameter of {architecture}.",
                spec=spec.model_type,
                key=module,
            )
    output_norm = _fill(spec.output_norm, base, None) if spec.output_norm else None
    return FusionPlan(
        spec.model_type, architecture, num_layers, spaces, parameters, hooks, residual_norms,
        output_norm if output_norm in residual_norms else None, repair_sites,
        {name: layer_of[name] for name in params if name in layer_of},
    )  # fmt: skip


def _present(template: str, base: str, layer: int | None, modules: dict) -> list[str]:
    """The module `template` names for `layer`, if this model has it (a pooler or a second head may be absent)."""
    name = _fill(template, base, layer)
    return [name] if name in modules else []


def _expand_parameters(spec: AlignmentSpec, base: str, num_layers: int) -> tuple[dict[str, tuple], dict[str, int]]:
    """Every name the spec's patterns expand to, with its axis bindings, and the layer of the `{i}` ones."""
    bound: dict[str, tuple] = {}
    layer_of: dict[str, int] = {}
    for pattern, axes in spec.parameters.items():
        for layer in _layers_of(pattern, num_layers):
            name = _fill(pattern, base, layer)
            if name in bound:
                raise UncoveredParameterError(
                    f"Parameter {name} is bound twice in the {spec.model_type!r} spec.", parameters=[name]
                )
            bound[name] = tuple(None if axis is None else axis.format(layer) for axis in axes)
            if layer is not None:
                layer_of[name] = layer
    return bound, layer_of


def _expand_spaces(spec: AlignmentSpec, config, num_layers: int) -> dict[str, Space]:
    """Spaces in flow order: a run of per-layer spaces expands layer by layer (heads.0, qk.0, ..., heads.1...)."""
    ordered: list[tuple[SpaceSpec, int | None]] = []
    run: list[SpaceSpec] = []
    for space in [*spec.spaces, None]:
        if space is not None and LAYER in space.name:
            run.append(space)
            continue
        ordered.extend((s, layer) for layer in range(num_layers) for s in run)
        run = []
        if space is not None:
            ordered.append((space, None))

    sizes = {
        (space.name, layer): _config_int(config, space.size, f"size of space {space.name}") for space, layer in ordered
    }
    resolved: dict[str, Space] = {}
    for space, layer in ordered:
        name = space.name.replace(LAYER, str(layer)) if layer is not None else space.name
        heads = space.heads.replace(LAYER, str(layer)) if space.heads and layer is not None else space.heads
        num_heads = None
        if heads is not None:
            num_heads = sizes[(space.heads, layer)]
            if sizes[(space.name, layer)] % num_heads:
                raise SpecError(
                    f"Space {name} ({sizes[(space.name, layer)]} units) does not split into {num_heads} heads.",
                    spec=spec.model_type,
                    key=name,
                )
        resolved[name] = Space(
            name, sizes[(space.name, layer)], heads, num_heads, space.stream, space.scaled_dot_product
        )
    return resolved


def _layers_of(template: str, num_layers: int) -> list[int | None]:
    return list(range(num_layers)) if LAYER in template else [None]


def _fill(template: str, base: str, layer: int | None) -> str:
    name = template.replace(BASE, base)
    return name.replace(LAYER, str(layer)) if layer is not None else name


def _config_int(config, key: str, what: str) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int):
        raise SpecError(
            f"The spec reads the {what} from config key {key!r}, which {type(config).__name__} lacks.", key=key
        )
    return value
