"""Exact rewrites of a pre-LN transformer that make its residual stream rotatable.

Permutations are not the only symmetry of a transformer's residual stream: once its normalisations commute
with rotations, any orthogonal change of basis of the stream (applied to every writer and reader) leaves the
function unchanged, and two independently trained models differ by such a rotation far more than by a
permutation (see `shared/QUALITY.md`). A LayerNorm `γ ⊙ (x − mean(x)) / std(x) + β` does not commute with
rotations, but two rewrites that keep the function exactly make it do so:

- **fold** each norm's γ and β into the linear layers that read its output (`W ← W diag(γ)`, `b ← b + W β`)
  and set γ = 1, β = 0;
- **centre** every writer of the stream (embeddings, attention output, FFN output) by subtracting, on its
  residual axis, the mean over the residual units: every token's residual vector then has zero mean, the norm's
  centring does nothing, and the norm acts as `x / rms(x)`, which commutes with every orthogonal O that maps
  the all-ones vector to itself.

The result is still the anchor's plain class (its norms hold weight 1 and bias 0): `from_pretrained` loads it.
Which norms read the stream, and which modules read each norm, is spec data (`residual_norms`); a spec without
it (post-LN BERT, whose norms sit on the stream itself) cannot be rotated.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..errors import SpecError
from .plan import FusionPlan, model_with_tensors, named_tensors


def check_rotatable(plan: FusionPlan) -> None:
    """Raises `SpecError` unless every reader of the residual stream reads it through a norm the spec lists."""
    stream = plan.stream
    if stream is None or not plan.residual_norms:
        raise SpecError(
            f"residual='orthogonal' needs a pre-LN architecture whose spec lists its `residual_norms`; the "
            f"{plan.model_type!r} spec has none (post-LN models such as BERT keep their norms on the residual stream "
            "itself, so the stream cannot be rotated without changing the architecture). Use residual='shared'.",
            spec=plan.model_type,
            key="residual_norms",
        )
    readers = {f"{reader}.weight" for modules in plan.residual_norms.values() for reader in modules}
    norms = {f"{norm}.{suffix}" for norm in plan.residual_norms for suffix in ("weight", "bias")}
    reads_stream = [
        name
        for name, axes in plan.parameters.items()
        if any(axis is not None and axis.reads and axis.space == stream for axis in axes)
    ]
    unread = [name for name in reads_stream if name not in readers and name not in norms]
    if unread:
        raise SpecError(
            f"Parameter(s) {unread[:3]} read the residual stream without a norm the {plan.model_type!r} spec lists "
            "in `residual_norms`, so the stream cannot be rotated; add their norm to the spec or use "
            "residual='shared'.",
            spec=plan.model_type,
            key=unread[0],
        )


def reparameterise(
    params: dict[str, torch.Tensor], plan: FusionPlan, keep_dtypes: bool = False
) -> dict[str, torch.Tensor]:
    """The parameters with every residual norm folded into its readers and every stream writer centred.

    Each tensor is rewritten in float64 on its own and returned in float64, or with `keep_dtypes` cast straight
    back to its own dtype, so that no float64 copy of the whole model is ever held (0.7 GB at ViT-B size). The
    input is not modified. Applying it to parameters that are already reparameterised changes nothing.
    """
    check_rotatable(plan)
    stream = plan.stream
    read_by: dict[str, str] = {}  # reader module -> the norm it reads
    for norm, readers in plan.residual_norms.items():
        for reader in readers:
            if reader in read_by:
                raise SpecError(
                    f"{reader} is listed as a reader of both {read_by[reader]} and {norm}; it reads one norm.",
                    spec=plan.model_type,
                    key=reader,
                )
            read_by[reader] = norm
            if f"{reader}.bias" not in params and bool(params[f"{norm}.bias"].abs().max() > 0):
                raise SpecError(
                    f"{reader} reads {norm} but has no bias to take the norm's bias; it cannot be folded.",
                    spec=plan.model_type,
                    key=reader,
                )
    result = {}
    for name, tensor in params.items():
        owner, _, kind = name.rpartition(".")
        rewritten = tensor.detach().to(torch.float64, copy=True)
        if owner in plan.residual_norms:  # the norm itself: weight 1, bias 0
            rewritten = torch.ones_like(rewritten) if kind == "weight" else torch.zeros_like(rewritten)
        else:
            if owner in read_by:  # fold: W <- W diag(gamma), b <- b + W beta
                norm = read_by[owner]
                gamma, beta = (params[f"{norm}.{part}"].detach().to(torch.float64) for part in ("weight", "bias"))
                dim = _reading_axis(plan, f"{owner}.weight", stream)
                if kind == "weight":
                    rewritten = (rewritten.movedim(dim, -1) * gamma).movedim(-1, dim).contiguous()
                elif kind == "bias":
                    weight = params[f"{owner}.weight"].detach().to(torch.float64).movedim(dim, -1)
                    rewritten = rewritten + weight @ beta
            for dim, axis in enumerate(plan.parameters.get(name, ())):  # centre the writers of the stream
                if axis is not None and axis.space == stream and not axis.reads:
                    rewritten = rewritten - rewritten.mean(dim, keepdim=True)
        result[name] = rewritten.to(tensor.dtype) if keep_dtypes else rewritten
    return result


def fusion_tensors(model: PreTrainedModel, plan: FusionPlan, rotates: bool) -> dict[str, torch.Tensor]:
    """The tensors of a parent as they are aligned and averaged: its own, or reparameterised when the residual
    `rotates` (`FusionConfig.residual="orthogonal"`), folded in float64 one tensor at a time and kept in the
    parameters' own dtype."""
    params = named_tensors(model)
    return reparameterise(params, plan, keep_dtypes=True) if rotates else params


def reparameterised_copy(model: PreTrainedModel, plan: FusionPlan) -> PreTrainedModel:
    """A copy of `model` with its residual norms folded and its writers centred; it computes the same function."""
    return model_with_tensors(model, reparameterise(named_tensors(model), plan))


def output_norm_of(model: PreTrainedModel, plan: FusionPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A copy of the weight and bias of `model`'s output norm, for `restore_output_norm` once the model's own
    tensors were reparameterised or overwritten; None when the spec names no output norm."""
    norm = plan.output_norm
    if not norm:
        return None
    own = dict(model.named_parameters())
    return own[f"{norm}.weight"].detach().clone(), own[f"{norm}.bias"].detach().clone()


def restore_output_norm(model: PreTrainedModel, plan: FusionPlan, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Gives a reparameterised model's output norm the weight and bias of the anchor's (exact; in place).

    The readers of the norm compensate (`W ← W diag(1/γ)`, `b ← b − W β`, the fold undone), so logits stay as they
    are while `last_hidden_state` is again on the anchor's scale. Skipped, returning False, when the spec names
    no output norm or a weight is too close to 0 to divide by.
    """
    norm = plan.output_norm
    params = dict(model.named_parameters())
    readers = plan.residual_norms.get(norm, []) if norm else []
    lacks_bias = any(f"{reader}.bias" not in params for reader in readers) and bool(bias.abs().max() > 0)
    if norm is None or lacks_bias or bool(weight.abs().min() < 1e-6):
        return False
    gamma, beta = weight.detach().to(torch.float64), bias.detach().to(torch.float64)
    with torch.no_grad():
        for reader in plan.residual_norms[norm]:
            dim = _reading_axis(plan, f"{reader}.weight", plan.stream)
            reading = params[f"{reader}.weight"].double().movedim(dim, -1) / gamma
            if f"{reader}.bias" in params:
                reader_bias = params[f"{reader}.bias"]
                reader_bias.copy_((reader_bias.double() - reading @ beta).to(reader_bias.dtype))
            params[f"{reader}.weight"].copy_(reading.movedim(-1, dim).to(params[f"{reader}.weight"].dtype))
        params[f"{norm}.weight"].copy_(gamma.to(params[f"{norm}.weight"].dtype))
        params[f"{norm}.bias"].copy_(beta.to(params[f"{norm}.bias"].dtype))
    return True


def _reading_axis(plan: FusionPlan, name: str, stream: str) -> int:
    axes = plan.parameters[name]
    found = [dim for dim, axis in enumerate(axes) if axis is not None and axis.reads and axis.space == stream]
    if len(found) != 1:
        raise SpecError(
            f"{name} is listed as a reader of a residual norm but no single axis of it reads {stream!r}.",
            spec=plan.model_type,
            key=name,
        )
    return found[0]
