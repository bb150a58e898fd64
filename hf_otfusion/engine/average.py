"""The average step: the weighted sum of the parents' tensors, each moved into the anchor's basis by its maps.

Written into the fused model in place, piece by piece (`align.pieces`), so that neither an aligned copy of a
whole parent nor a float64 copy of a whole large tensor ever exists; checkpoint parents can be added one group
at a time (`accumulate`), so two parents fuse in the memory of two models.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .align import align_tensor, pieces
from .plan import FusionPlan
from .transport import TransportMap


def average_into(
    fused: PreTrainedModel,
    params: dict[int, dict[str, torch.Tensor]],
    plans: list[FusionPlan],
    maps: dict[int, dict[str, TransportMap]],
    weights: list[float],
    accumulate: bool = False,
) -> None:
    """Writes into `fused`, tensor by tensor, the weighted sum of the aligned tensors of the parents in `params`.

    The first call gets the anchor among `params` and overwrites `fused`, which may be the anchor itself (each
    piece is read before it is written); `accumulate=True` adds more parents to what `fused` already holds.
    Parents are aligned one piece of one tensor at a time while mixing (`align.pieces`), so no aligned copy of a
    whole parent, nor a float64 copy of a whole large tensor, ever exists.
    """
    with torch.no_grad():
        for name, param in fused.named_parameters():
            for piece in pieces(param.shape, plans[min(params)].parameters[name]):
                target = param[piece]  # a view: writing it writes the parameter
                mixed = target.double() if accumulate else torch.zeros(target.shape, dtype=torch.float64)
                for k in sorted(params):
                    tensor = params[k][name][piece]
                    axes = plans[k].parameters[name]
                    mixed.add_(align_tensor(tensor, axes, maps[k]) if k in maps else tensor.double(), alpha=weights[k])
                target.copy_(mixed.to(param.dtype))
