"""Moving a parent's tensors into the anchor's basis with the transport maps of their spaces."""

from __future__ import annotations

import torch

from .plan import FusionPlan
from .spec import AxisBinding
from .transport import TransportMap

# the most elements aligned at once when a tensor is handled in pieces (32 MB in float64; a BERT word embedding
# is 190 MB, and aligning, mixing or comparing it whole takes several float64 copies)
PIECE_ELEMENTS = 1 << 22


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


def pieces(shape: torch.Size, axes: tuple) -> list[tuple[slice, ...]]:
    """Index tuples covering a tensor in pieces of about `PIECE_ELEMENTS`, cut along an axis no map touches.

    Maps act on aligned axes only, so aligning a slice along an unaligned one (the vocabulary of an embedding)
    gives that slice of the aligned tensor. Tensors that are small or have no such axis stay whole.
    """
    numel = shape.numel()
    free = [dim for dim, axis in enumerate(axes) if axis is None and shape[dim] > 1]
    if numel <= PIECE_ELEMENTS or not free:
        return [()]
    dim = free[0]
    step = max(1, PIECE_ELEMENTS * shape[dim] // numel)
    return [(slice(None),) * dim + (slice(start, start + step),) for start in range(0, shape[dim], step)]
