"""Function-preserving random permutations and rotations of a model's units: the ground truth fusion must undo.

Permuting the residual dimensions, the heads, the dimensions within each head (Q/K and V/O separately) and
the FFN units consistently in every tensor leaves the network's function unchanged. So does rotating the
residual stream of a reparameterised pre-LN model (`hf_otfusion.engine.reparameterise`) by an orthogonal matrix
that fixes the all-ones vector. Fusing a model with such a copy of itself must give the model back, which is
the strongest end-to-end check of the engine.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedModel

from .align import align_parameters
from .plan import model_with_tensors, named_tensors, resolve_plan
from .reparameterise import reparameterise
from .spec import AlignmentSpec
from .transport import TransportMap, complement_basis


def random_permutations(
    model: PreTrainedModel, seed: int = 0, spec: AlignmentSpec | None = None
) -> dict[str, np.ndarray]:
    """One permutation per space; nested head spaces permute whole heads, then dimensions inside each head.

    `permutations[space][j]` is the original unit that lands at position j.
    """
    plan = resolve_plan(model, spec)
    rng = np.random.default_rng(seed)
    permutations: dict[str, np.ndarray] = {}
    for space in plan.spaces.values():
        if space.heads is None:
            permutations[space.name] = rng.permutation(space.size)
    for space in plan.spaces.values():
        if space.heads is not None:
            head_order, dim = permutations[space.heads], space.head_dim
            permutations[space.name] = np.concatenate([head * dim + rng.permutation(dim) for head in head_order])
    return permutations


def permute_model(model: PreTrainedModel, seed: int = 0, spec: AlignmentSpec | None = None) -> PreTrainedModel:
    """A copy of `model` with every space randomly permuted; it computes the same function."""
    plan = resolve_plan(model, spec)
    maps = {
        space: TransportMap.from_permutation(permutation)
        for space, permutation in random_permutations(model, seed, spec).items()
    }
    return model_with_tensors(model, align_parameters(named_tensors(model), plan, maps))


def random_rotation_fixing_ones(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal matrix O (size x size) with O·1 = 1: a rotation of the complement of the ones vector."""
    basis = complement_basis(np.full(size, 1.0 / np.sqrt(size)))
    rotation, _ = np.linalg.qr(rng.standard_normal((size - 1, size - 1)))
    return basis @ rotation @ basis.T + np.full((size, size), 1.0 / size)


def rotate_model(
    model: PreTrainedModel,
    seed: int = 0,
    spec: AlignmentSpec | None = None,
    residual: bool = True,
    within_heads: bool = False,
) -> PreTrainedModel:
    """A copy of `model` with every space randomly permuted, and rotated where the function allows it.

    `residual=True` (pre-LN models) reparameterises the copy and rotates its residual stream by a random
    orthogonal matrix fixing the ones vector: the copy computes the same function as the reparameterised
    model (and so, with a task head, as `model`). `within_heads=True` rotates the dims inside each head (one
    random rotation per head and nested space: Q/K share theirs, V/O theirs), after permuting the heads.
    """
    plan = resolve_plan(model, spec)
    rng = np.random.default_rng(seed)
    permutations = random_permutations(model, seed, spec)
    maps = {space: TransportMap.from_permutation(permutation) for space, permutation in permutations.items()}
    if within_heads:
        for space in plan.spaces.values():
            if space.heads is not None:
                dim, matrix = space.head_dim, np.zeros((space.size, space.size))
                for target, source in enumerate(permutations[space.heads]):
                    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
                    matrix[source * dim : (source + 1) * dim, target * dim : (target + 1) * dim] = rotation
                maps[space.name] = TransportMap.from_orthogonal(matrix)
    params = named_tensors(model)
    if residual:
        params = reparameterise(params, plan)
        stream = plan.stream
        assert stream is not None  # reparameterise refuses a plan without a residual stream
        maps[stream] = TransportMap.from_orthogonal(random_rotation_fixing_ones(plan.spaces[stream].size, rng))
    return model_with_tensors(model, align_parameters(params, plan, maps))
