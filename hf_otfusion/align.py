"""Moving a parent's tensors into the anchor's basis with the transport maps of their spaces."""

from __future__ import annotations

import torch

from .plan import FusionPlan
from .spec import AxisBinding
from .transport import TransportMap


def align_tensor(
    tensor: torch.Tensor,
    axes: tuple[AxisBinding | None, ...],
    maps: dict[str, TransportMap],
    skip_axis: int | None = None,
) -> torch.Tensor:
    """Applies the map of every bound axis that has one (in float64); other axes are left as they are.

    Axes that hold a unit use the output-side matrix, axes that read it the input-side matrix; both contract
    the parent's units into the anchor's (see `TransportMap`).
    """
    result = tensor.detach().to(torch.float64)
    for dim, axis in enumerate(axes):
        if axis is None or dim == skip_axis or axis.space not in maps:
            continue
        transport = maps[axis.space]
        if transport.permutation is not None:  # both normalisations reduce to the same gather
            result = result.index_select(dim, torch.from_numpy(transport.permutation))
            if transport.output_scale != 1.0 and not axis.reads:
                result = result * transport.output_scale
            continue
        matrix = transport.input_matrix() if axis.reads else transport.output_matrix()
        moved = result.movedim(dim, 0)
        contracted = torch.from_numpy(matrix).T @ moved.reshape(moved.shape[0], -1)
        result = contracted.reshape(matrix.shape[1], *moved.shape[1:]).movedim(0, dim)
    return result


def align_parameters(
    params: dict[str, torch.Tensor], plan: FusionPlan, maps: dict[str, TransportMap]
) -> dict[str, torch.Tensor]:
    """Every parameter of a parent, expressed in the anchor's basis (float64)."""
    return {name: align_tensor(tensor, plan.parameters[name], maps) for name, tensor in params.items()}
