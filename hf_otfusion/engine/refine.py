"""Learned refinement of the orthogonal maps: a few hundred gradient steps towards the parents' ensemble.

The closed-form maps align each parent's units with the anchor's one space at a time, from second moments.
What fusion really wants is that the *average* of the aligned parents computes what the parents compute
together. Refinement optimises exactly that, and nothing else: every orthogonal map of a non-anchor parent
(its residual rotation, its within-head rotations) is multiplied by a learned rotation Δ = exp(S − Sᵀ) that
starts at the identity (the residual one restricted to rotations fixing the all-ones vector), and the fused
model Σ_k α_k align(θ_k; O_k Δ_k) is trained to match the mean of the parents' output distributions on the
alignment data (KL divergence; no labels needed). Permutations and couplings stay as solved. With `invertible`,
the maps that V and O share inside each head learn Δ = exp(S) instead: any basis change of a head's values
keeps the function (O reads what V writes: V → ΔᵀV, O → OΔ⁻ᵀ), a larger symmetry than rotations. The result is
still an average of aligned parents, so it loads as the anchor's plain class.

Every fifth batch of the alignment data is held back: the maps kept are those with the lowest held-back loss
seen, the closed-form start included, so refinement never makes that loss worse. Written here because no
library optimises the alignment of transformer parents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields

import torch
from scipy.optimize import linear_sum_assignment
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import FusionError
from .align import align_tensor
from .held_back import LogitsOf, divergence, ensemble, logits, split
from .passes import batches, evaluating
from .plan import FusionPlan
from .transport import TransportMap, complement_basis

logger = logging.getLogger(__name__)

PERMUTATION_MARGIN = 1.0  # a permutation's starting score lead: Adam steps of ~lr each must overcome it to swap
EVALUATE_EVERY = 10  # steps between two held-back evaluations


@dataclass
class RefineReport:
    """What refinement did: steps run, the step kept, and the held-back KL divergence before and after."""

    steps: int
    best_step: int
    held_back_loss_before: float
    held_back_loss_after: float
    anchor_held_back_loss: float  # the anchor alone, against the same ensemble: what fusion has to beat
    seconds: float
    # the parents' learned weights per group of layers (`mixing=True`): {group: [weight of parent k, ...]}
    layer_weights: dict[str, list[float]] | None = None
    # the fused tensors refinement learned (`norms`, `mixing`), to be written over the average; not reported
    learned: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def worse_than_anchor(self) -> bool:
        return self.held_back_loss_after > self.anchor_held_back_loss

    def to_dict(self) -> dict:
        reported = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "learned"}
        return {**reported, "seconds": round(self.seconds, 2), "learned_tensors": len(self.learned)}


class _BasisChange(torch.nn.Module):
    """Δ = exp(S − Sᵀ) as one matrix, or block-diagonal per head; on the complement of the ones vector for a stream.

    With `invertible` (heads only), Δ = exp(S) per head: invertible for every S (det = e^{tr S} > 0), and the
    readers of the space take Δ⁻ᵀ = exp(−Sᵀ), so nothing is inverted numerically while training.
    """

    def __init__(self, size: int, heads: int | None, fixes_ones: bool, invertible: bool = False):
        super().__init__()
        self.size, self.heads, self.invertible = size, heads, invertible
        self.basis = None
        if fixes_ones:
            ones = torch.full((size,), size**-0.5, dtype=torch.float64)
            self.basis = torch.from_numpy(complement_basis(ones.numpy()))  # float64, cast in `forward`
            self.skew = torch.nn.Parameter(torch.zeros(size - 1, size - 1))
        elif heads is not None:
            dim = size // heads
            self.skew = torch.nn.Parameter(torch.zeros(heads, dim, dim))
        else:
            self.skew = torch.nn.Parameter(torch.zeros(size, size))

    def forward(self, dtype: torch.dtype = torch.float32, readers: bool = False) -> torch.Tensor:
        """Δ in `dtype` (Δ⁻ᵀ for `readers`; the same matrix for a rotation): float32 while training; float64 for
        the map written back, which is then orthogonal to rounding (a float32 Δ is only orthogonal to ~1e-6,
        which `align_parents` would not count as exact)."""
        skew = self.skew.to(dtype)
        if self.invertible:
            generator = -skew.transpose(-1, -2) if readers else skew
        else:
            generator = skew - skew.transpose(-1, -2)
        rotation = torch.linalg.matrix_exp(generator)
        if self.basis is not None:
            basis = self.basis.to(dtype)
            return basis @ rotation @ basis.T + torch.full((self.size, self.size), 1.0 / self.size, dtype=dtype)
        if self.heads is not None:
            return torch.block_diag(*rotation)
        return rotation


class _Permutation(torch.nn.Module):
    """A hard permutation Π in the forward pass whose gradient reaches learned scores (straight-through).

    Scores start at `PERMUTATION_MARGIN` on the diagonal, so Π starts at the identity (the closed-form matching);
    the forward pass uses the assignment that maximises the scores (`linear_sum_assignment`), and the backward
    pass hands Π's gradient to the scores unchanged. Two units swap once the gradient has pushed their cross
    scores past their own, which keeps every fused model on the path an exact average of permuted parents.
    """

    def __init__(self, size: int):
        super().__init__()
        self.scores = torch.nn.Parameter(PERMUTATION_MARGIN * torch.eye(size))

    def forward(self) -> torch.Tensor:
        rows, cols = linear_sum_assignment(self.scores.detach().numpy(), maximize=True)
        hard = torch.zeros_like(self.scores)
        hard[rows, cols] = 1.0
        return hard + self.scores - self.scores.detach()


class _Mixing(torch.nn.Module):
    """Each parent's averaging weight per group of layers (`FusionPlan.parameter_group`: embeddings, each layer,
    head): a softmax over the parents of learned logits, started at the given weights. The fused model stays a
    weighted average of the aligned parents."""

    def __init__(self, plan: FusionPlan, parents: list[int], weights: list[float]):
        super().__init__()
        group_of = {name: plan.parameter_group(name) for name in plan.parameters}  # once: looked up every step
        self.groups = {group: i for i, group in enumerate(dict.fromkeys(group_of.values()))}  # in model order
        self.row = {name: self.groups[group] for name, group in group_of.items()}
        self.parents = {k: j for j, k in enumerate(parents)}
        start = torch.tensor([max(weights[k], 1e-6) for k in parents]).log()
        self.logits = torch.nn.Parameter(start.repeat(len(self.groups), 1))

    def forward(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def weight(self, mixing: torch.Tensor, k: int, name: str) -> torch.Tensor:
        return mixing[self.row[name], self.parents[k]]

    def report(self) -> dict[str, list[float]]:
        mixing = self().detach()
        return {g: [round(float(w), 4) for w in mixing[i]] for g, i in self.groups.items()}


class _Trained(torch.nn.Module):
    """Everything refinement learns, as one module: one optimiser, one state to keep at the best held-back step."""

    def __init__(self, maps: torch.nn.ModuleList, norms: torch.nn.ParameterList, mixing: _Mixing | None):
        super().__init__()
        self.maps, self.norms, self.mixing = maps, norms, mixing


def refine_maps(
    model: PreTrainedModel,
    plan: FusionPlan,
    params: dict[int, dict[str, torch.Tensor]],
    maps: dict[int, dict[str, TransportMap]],
    weights: list[float],
    data,
    *,
    steps: int,
    learning_rate: float,
    statistics_options: dict,
    permutations: bool = False,
    norms: bool = False,
    mixing: bool = False,
    invertible: bool = False,
    progress: bool = True,
) -> RefineReport:
    """Refines every orthogonal map in `maps` in place (see the module docstring) and returns what it did.

    Args:
        model: a model of the fused class, used as the function (its own tensors are not read).
        plan: the anchor's plan.
        params: each parent's tensors as they enter the average (reparameterised where the residual rotates).
        maps: `maps[k][space]` for every non-anchor parent k; its orthogonal maps are replaced by refined ones.
        weights: the parents' averaging weights.
        data: the alignment data; `statistics_options` gives its batching and sample cap.
        permutations: also refine the permutations of spaces outside the heads and the stream (the FFN units),
            straight-through (`_Permutation`).
        norms: also learn the fused model's LayerNorm weights and biases (the output norm excepted), started at
            the average: a learned repair of each norm's per-channel scale and shift, returned in
            `RefineReport.learned` for the caller to write over the average.
        mixing: also learn each parent's averaging weight per group of layers (`_Mixing`); every fused tensor
            is then returned in `RefineReport.learned`, and the weights in `RefineReport.layer_weights`.
        invertible: the within-head maps of spaces without a scaled dot product (V/O) become invertible
            (`_BasisChange(invertible=True)`), written back as `TransportMap.from_invertible`.

    Raises:
        FusionError: no map to refine, too little data to hold a batch back, or a model without logits.
    """
    started = time.perf_counter()

    def refined_kind(space: str, transport: TransportMap) -> bool:
        if transport.kind == "orthogonal":
            return True
        plain = not plan.spaces[space].stream and plan.spaces[space].num_heads is None
        return permutations and transport.kind == "permutation" and plain

    spaces = {k: [s for s, t in parent_maps.items() if refined_kind(s, t)] for k, parent_maps in maps.items()}
    if not any(spaces.values()):
        raise FusionError(
            "refine_steps refines orthogonal maps, and this fusion has none: use residual='orthogonal' (pre-LN "
            "models) and/or within_heads='orthogonal'."
        )
    loaded = list(batches(data, model, statistics_options.get("batch_size", 8), statistics_options.get("num_samples")))
    training, held_back = split(loaded)  # the held-back batches decide which refined maps are kept
    with evaluating([model]):  # no dropout while compared with the ensemble; the caller's mode back after
        # each parent's tensors in the anchor's basis under the closed-form maps: Δ = I reproduces today's fusion
        aligned = {
            k: {name: align_tensor(t, plan.parameters[name], maps.get(k, {})).float() for name, t in tensors.items()}
            for k, tensors in params.items()
        }
        parents = [_called_with(model, tensors) for tensors in aligned.values()]
        targets = [ensemble(parents, [weights[k] for k in aligned], batch) for batch in loaded]
        target_of = {id(batch): target for batch, target in zip(loaded, targets, strict=True)}
        refined = [(k, space) for k, names in spaces.items() for space in names]

        def general(space: str) -> bool:  # a head space that only linear maps read: values, not queries and keys
            return invertible and plan.spaces[space].heads is not None and not plan.spaces[space].scaled_dot_product

        if invertible and not any(general(space) and maps[k][space].kind == "orthogonal" for k, space in refined):
            raise FusionError(
                "refine_invertible learns the value maps inside matched heads, and this fusion rotates none: use "
                "within_heads='orthogonal' (cost='activations', heads='aware', solver='exact')."
            )
        rotations = torch.nn.ModuleList(
            _BasisChange(
                plan.spaces[space].size, plan.spaces[space].num_heads, fixes_ones=plan.spaces[space].stream,
                invertible=general(space),
            )
            if maps[k][space].kind == "orthogonal"
            else _Permutation(plan.spaces[space].size)
            for k, space in refined
        )  # fmt: skip
        norm_names = _norm_tensor_names(model, plan) if norms else []
        # started at their average (the closed-form maps keep a reparameterised norm's ones and zeros as they are)
        learned = torch.nn.ParameterList(
            torch.nn.Parameter(sum(weights[k] * aligned[k][name] for k in aligned)) for name in norm_names
        )
        mixer = _Mixing(plan, list(aligned), weights) if mixing else None
        # the tensors rebuilt at every step: those on a refined axis, and with learned weights every averaged one. In
        # the plan's order: the order they are built in is the order backward sums their gradients in (a set's order
        # would change with each process's string-hash seed, and so would the rounding)
        moving_names = [
            name
            for name, axes in plan.parameters.items()
            if name not in norm_names
            and (mixer is not None or any(a is not None and _moves(a.space, spaces) for a in axes))
        ]
        fixed = {
            name: sum(weights[k] * aligned[k][name] for k in aligned)
            for name in plan.parameters
            if name not in moving_names and name not in norm_names
        }

        def fused_parameters() -> dict[str, torch.Tensor]:
            deltas = {key: rotation() for key, rotation in zip(refined, rotations, strict=True)}
            read_deltas = {
                key: rotation(readers=True)
                for key, rotation in zip(refined, rotations, strict=True)
                if isinstance(rotation, _BasisChange) and rotation.invertible
            }
            mix = mixer() if mixer is not None else None
            result = dict(fixed)
            for name in moving_names:
                total = 0.0
                for k in aligned:
                    tensor = aligned[k][name]
                    for dim, axis in enumerate(plan.parameters[name]):
                        key = (k, axis.space) if axis is not None else None
                        if key in deltas:  # new = Δᵀ old along the axis: the composed map is O Δ (readers: O Δ⁻ᵀ)
                            delta = read_deltas.get(key, deltas[key]) if axis.reads else deltas[key]
                            tensor = torch.tensordot(delta, tensor.movedim(dim, 0), dims=([0], [0])).movedim(0, dim)
                    total = total + (weights[k] if mixer is None else mixer.weight(mix, k, name)) * tensor
                result[name] = total
            result.update(zip(norm_names, learned, strict=True))
            return result

        def loss_on(batch, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            fused = _called_with(model, tensors)(batch)
            return torch.nn.functional.kl_div(fused.log_softmax(-1), target_of[id(batch)], reduction="batchmean")

        held_back_targets = [target_of[id(batch)] for batch in held_back]

        def held_back_loss() -> float:
            with torch.no_grad():
                tensors = fused_parameters()  # once per evaluation: nothing learned changes between its batches
            return divergence(_called_with(model, tensors), held_back, held_back_targets)

        trained = _Trained(rotations, learned, mixer)
        optimiser = torch.optim.Adam(trained.parameters(), lr=learning_rate)
        before = best = held_back_loss()
        best_step, best_state = 0, {key: value.detach().clone() for key, value in trained.state_dict().items()}
        for step in tqdm(range(1, steps + 1), desc="refine alignment", unit="step", disable=not progress):
            optimiser.zero_grad()
            loss_on(training[(step - 1) % len(training)], fused_parameters()).backward()
            optimiser.step()
            if step % EVALUATE_EVERY == 0 or step == steps:
                current = held_back_loss()
                if current < best:
                    best, best_step = current, step
                    best_state = {key: value.detach().clone() for key, value in trained.state_dict().items()}
        trained.load_state_dict(best_state)
        anchor = next(k for k in aligned if k not in maps)
        anchor_loss = divergence(_called_with(model, aligned[anchor]), held_back, held_back_targets)
        if best > anchor_loss:
            logger.warning(
                "After refinement the fused model is further from the parents' ensemble on held-back data than the "
                "anchor alone (KL %.4f vs %.4f): the parents may be too far apart to fuse well; compare on your task.",
                best, anchor_loss,
            )  # fmt: skip
        with torch.no_grad():
            for (k, space), rotation in zip(refined, rotations, strict=True):
                if isinstance(rotation, _Permutation):  # Π[σ[j], j] = 1 after the closed-form perm: composed perm[σ]
                    sigma = rotation().argmax(dim=0).numpy()
                    maps[k][space] = TransportMap.from_permutation(maps[k][space].permutation[sigma])
                    continue
                closed_form = maps[k][space].output_matrix()
                composed = closed_form @ rotation(torch.float64).numpy()
                written = TransportMap.from_invertible if rotation.invertible else TransportMap.from_orthogonal
                maps[k][space] = written(composed)
        with torch.no_grad():
            if mixer is not None:  # every tensor is a learned mixture: the caller writes them all
                tensors = {name: tensor.detach().clone() for name, tensor in fused_parameters().items()}
            else:
                tensors = {name: tensor.detach().clone() for name, tensor in zip(norm_names, learned, strict=True)}
        layer_weights = mixer.report() if mixer is not None else None
        return RefineReport(
            steps, best_step, before, best, float(anchor_loss), time.perf_counter() - started, layer_weights, tensors
        )


def _norm_tensor_names(model: PreTrainedModel, plan: FusionPlan) -> list[str]:
    """The weight and bias names of every LayerNorm but the output norm (which the fusion gives back the anchor's)."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and module_name != plan.output_norm:
            names += [f"{module_name}.{p}" for p in ("weight", "bias") if f"{module_name}.{p}" in plan.parameters]
    return names


def _moves(space: str, spaces: dict[int, list[str]]) -> bool:
    return any(space in names for names in spaces.values())


def _called_with(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> LogitsOf:
    """The logits of `model` run with `tensors` in place of its own, as a function of the batch."""
    return lambda batch: logits(functional_call(model, tensors, args=(), kwargs=batch))
