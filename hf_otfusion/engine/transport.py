"""Optimal-transport solvers and the transport map they define. No model knowledge lives here.

A `TransportMap` holds a coupling P (n_a x n_b, summing to 1) between the units of a parent (a) and of the
anchor (b), with marginals mu and nu. It moves tensors into the anchor's basis with the two normalisations
that keep fusion exact when widths differ (see DESIGN.md):
- output side (rows, biases, LayerNorm, embedding columns): X' = (P diag(1/nu))^T X, a convex combination of
  the parent's units for each anchor unit;
- input side (weight columns reading the unit): W' = W diag(1/mu) P, whose rows sum to 1.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import ot
import ot.batch
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import entr

from ..errors import TransportError

logger = logging.getLogger(__name__)

# Marginal tolerance of Sinkhorn; tighter buys nothing here because the anchor-side marginal is projected
# exactly afterwards, and costs many iterations when plans are nearly hard.
SINKHORN_TOL = 1e-6


class TransportMap:
    """A change of basis from a parent's units (rows) to the anchor's (columns): a coupling or a matrix.

    `kind` says which: `permutation` (a hard one-to-one matching), `coupling` (a soft or uneven OT plan, with
    its two normalisations), `orthogonal` (a rotation of the units, `from_orthogonal`: both sides use the
    matrix itself, since its inverse is its transpose) or `invertible` (any change of basis, `from_invertible`:
    the readers take the inverse transpose, so what they read is unchanged). Every kind moves tensors through
    `output_matrix` and `input_matrix`, so aligning and averaging are one code path for all of them.

    A hard one-to-one matching with uniform marginals is stored as its permutation alone (n integers instead
    of n^2 floats: 12 exact FFN maps of BERT-base take 300 KB instead of 900 MB), and `plan` is built on demand.

    `output_scale` multiplies the output side only. It is 1 except for query/key spaces whose head size differs
    between parent and anchor: the logits Q·Kᵀ/√d_head contract the head dims, so averaging r = d_a/d_b parent
    dims into each anchor dim shrinks Q·Kᵀ by r while the temperature changes by √r; scaling both Q and K by
    (d_a/d_b)^(1/4) undoes both, which makes a copy with duplicated head dims fuse back exactly.
    """

    def __init__(
        self,
        plan: np.ndarray | None,
        mu: np.ndarray,
        nu: np.ndarray,
        permutation: np.ndarray | None = None,
        output_scale: float = 1.0,
    ):
        if (plan is None) == (permutation is None):
            raise TransportError("Give a TransportMap either a dense plan or a permutation.")
        self._plan = plan
        self._permutation = permutation
        self._linear: np.ndarray | None = None  # the output-side matrix of an orthogonal or invertible map
        self._linear_input: np.ndarray | None = None  # its input side: the same matrix, or its inverse transpose
        self._linear_kind: str | None = None
        self.mu, self.nu = mu, nu
        self.output_scale = output_scale

    @classmethod
    def from_permutation(cls, permutation: np.ndarray) -> TransportMap:
        """The map sending parent unit `permutation[j]` to anchor unit `j`."""
        n = len(permutation)
        return cls(None, uniform(n), uniform(n), permutation=np.asarray(permutation, dtype=np.int64))

    @classmethod
    def from_orthogonal(cls, matrix: np.ndarray) -> TransportMap:
        """The map sending a parent vector x to Oᵀx (O square and orthogonal): rows and readers both use O.

        Its `plan` is the coupling O∘O / n (the squared entries: rows and columns sum to one since O is
        orthogonal), so entropy, softness and the share of units left in place read as for a coupling.
        """
        matrix = np.asarray(matrix, dtype=np.float64)
        n = matrix.shape[0]
        transport = cls(matrix**2 / n, uniform(n), uniform(n))
        transport._linear, transport._linear_input, transport._linear_kind = matrix, matrix, "orthogonal"
        return transport

    @classmethod
    def from_invertible(cls, matrix: np.ndarray) -> TransportMap:
        """The map sending a parent vector x to Mᵀx (M square and invertible); readers use M⁻ᵀ, so W x = W' x'.

        Only spaces that no nonlinearity or norm acts on admit it (the values of an attention head: O reads what
        V writes). Its `plan` is M∘M normalised to sum 1, for the diagnostics only (not a coupling's marginals).
        """
        matrix = np.asarray(matrix, dtype=np.float64)
        n = matrix.shape[0]
        transport = cls(matrix**2 / (matrix**2).sum(), uniform(n), uniform(n))
        transport._linear, transport._linear_input = matrix, np.linalg.inv(matrix).T
        transport._linear_kind = "invertible"
        return transport

    @property
    def kind(self) -> str:
        """`permutation`, `coupling`, `orthogonal` or `invertible`: what sort of basis change this map is."""
        if self._linear_kind is not None:
            return self._linear_kind
        return "permutation" if self.permutation is not None else "coupling"

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.mu), len(self.nu))

    @property
    def plan(self) -> np.ndarray:
        """The dense coupling (n_a x n_b, summing to 1); built anew from the permutation for compact maps."""
        if self._plan is not None:
            return self._plan
        n = len(self._permutation)
        plan = np.zeros((n, n))
        plan[self._permutation, np.arange(n)] = 1.0 / n
        return plan

    @cached_property
    def permutation(self) -> np.ndarray | None:
        """`permutation[j]`, the parent unit sent to anchor unit j, when the plan is a hard one-to-one matching.

        Applying such a map is a gather, far cheaper than the dense matrix product of the general case.
        """
        if self._permutation is not None:
            return self._permutation
        if self._linear is not None:
            return None
        n_a, n_b = self.shape
        if n_a != n_b:
            return None
        sources = self._plan.argmax(axis=0)
        if np.count_nonzero(self._plan) != n_b or len(np.unique(sources)) != n_b:
            return None
        return sources

    def output_matrix(self) -> np.ndarray:
        """M with X'_b = sum_a M[a, b] X_a for axes that hold the unit (P diag(1/nu), times `output_scale`)."""
        matrix = self._linear if self._linear is not None else self.plan / self.nu[None, :]
        return matrix * self.output_scale if self.output_scale != 1.0 else matrix

    def input_matrix(self) -> np.ndarray:
        """M with W'_{:, b} = sum_a W_{:, a} M[a, b] for axes that read the unit (diag(1/mu) P)."""
        if self._linear_input is not None:
            return self._linear_input
        return self.plan / self.mu[:, None]


@dataclass
class SolveInfo:
    """What one OT solve did: logged per space so that softness and quality can be inspected."""

    solver: str
    reg: float | None
    transport_cost: float
    entropy: float
    softness: float


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def importance_marginal(importance: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """A marginal proportional to unit importances, each at least `floor` x their mean: a dead unit keeps some mass,
    so the input side (which divides by the marginal) stays defined."""
    importance = np.maximum(np.asarray(importance, dtype=np.float64), 0.0)
    importance = np.maximum(importance, floor * max(float(importance.mean()), np.finfo(np.float64).tiny))
    return importance / importance.sum()


def solve_transport(
    cost: np.ndarray,
    *,
    solver: str = "exact",
    reg: float = 0.05,
    reg_mode: str = "relative",
    mu: np.ndarray | None = None,
    nu: np.ndarray | None = None,
    emd_max_iter: int = 10_000_000,
    sinkhorn_max_iter: int = 1000,
    device: torch.device | str | None = None,
) -> tuple[TransportMap, SolveInfo]:
    """Solves OT between parent units (rows of `cost`) and anchor units (columns).

    Args:
        cost: ground cost, shape (n_a, n_b).
        solver: `exact` (linear assignment when widths are equal and marginals uniform, else POT `emd`) or
            `sinkhorn` (POT's Sinkhorn on the reduced cost, see `reduced_cost`).
        reg: entropic regularisation; with `reg_mode="relative"` it multiplies `cost_scale(cost)`.
        mu, nu: marginals (uniform when None).
        device: where Sinkhorn iterates (a GPU for large spaces; default CPU). Exact solves run on the CPU.

    Returns:
        The transport map and a `SolveInfo` with the transport cost, the plan's entropy and its softness
        (0 for a permutation, 1 for the uniform plan).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n_a, n_b = cost.shape
    is_uniform = mu is None and nu is None
    mu = uniform(n_a) if mu is None else np.asarray(mu, dtype=np.float64)
    nu = uniform(n_b) if nu is None else np.asarray(nu, dtype=np.float64)
    used_reg = None
    if solver == "exact":
        if n_a == n_b and is_uniform:
            rows, cols = linear_sum_assignment(cost)
            permutation = np.empty(n_a, dtype=np.int64)
            permutation[cols] = rows
            transport_cost = float(cost[rows, cols].sum() / n_a)
            info = SolveInfo(solver, None, transport_cost, math.log(n_a), 0.0)
            return TransportMap.from_permutation(permutation), info
        plan = ot.emd(mu, nu, cost, numItermax=emd_max_iter)
    elif solver == "sinkhorn":
        used_reg = reg * cost_scale(cost) if reg_mode == "relative" else reg
        plan = _sinkhorn(reduced_cost(cost), used_reg, mu, nu, sinkhorn_max_iter, device)
    else:
        raise TransportError(f"Unknown solver {solver!r}; use 'exact' or 'sinkhorn'.", solver=solver)
    entropy = plan_entropy(plan)
    info = SolveInfo(solver, used_reg, float(np.vdot(plan, cost)), entropy, softness(entropy, n_a, n_b))
    return TransportMap(plan, mu, nu), info


def solve_transport_batch(
    costs: np.ndarray,
    *,
    solver: str = "exact",
    reg: float = 0.05,
    reg_mode: str = "relative",
    sinkhorn_max_iter: int = 1000,
    device: torch.device | str | None = None,
) -> list[tuple[TransportMap, SolveInfo]]:
    """Solves many small problems of one shape (uniform marginals), e.g. every pair of attention heads.

    Sinkhorn runs as one batched POT solve on the costs rescaled per problem, so a relative `reg` gives each
    problem the softness it would get alone; exact problems are independent linear assignments. The batch
    stays in float64: small problems at small reg underflow to denormals in float32, which is slower.
    """
    costs = np.asarray(costs, dtype=np.float64)
    if solver != "sinkhorn":
        return [solve_transport(cost, solver=solver) for cost in costs]
    _, n_a, n_b = costs.shape
    if reg_mode == "relative":
        scales = np.array([cost_scale(cost) for cost in costs])
        regs = reg * scales
    else:
        scales, regs = np.ones(len(costs)), np.full(len(costs), reg)
    scaled = np.stack([reduced_cost(cost) for cost in costs]) / scales[:, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ot.batch.solve_batch(
            torch.from_numpy(scaled).to(device), reg=reg, method="sinkhorn",
            max_iter=sinkhorn_max_iter, tol=SINKHORN_TOL,
        )  # fmt: skip
    solved = []
    mu, nu = uniform(n_a), uniform(n_b)
    for plan, cost, used_reg in zip(result.plan.double().cpu().numpy(), costs, regs, strict=True):
        if not np.isfinite(plan).all():
            plan = _sinkhorn(reduced_cost(cost), used_reg, mu, nu, sinkhorn_max_iter, device)
        plan = _project_marginals(plan, mu, nu)
        entropy = plan_entropy(plan)
        info = SolveInfo("sinkhorn", float(used_reg), float((plan * cost).sum()), entropy, softness(entropy, n_a, n_b))
        solved.append((TransportMap(plan, mu, nu), info))
    return solved


def solve_orthogonal(cross_moment: np.ndarray, fixed: np.ndarray | None = None) -> TransportMap:
    """The orthogonal O maximising tr(Oᵀ C) for C = E[x_a x_bᵀ] (orthogonal Procrustes), so that Oᵀx_a ≈ x_b.

    With `fixed` (a vector, e.g. all ones), O is restricted to the rotations that map it to itself: the
    Procrustes problem is solved on an orthonormal basis Q of its orthogonal complement, O = Q U Vᵀ Qᵀ + ffᵀ
    with Qᵀ C Q = U S Vᵀ. Written here because POT has no Procrustes solver; it is one SVD.
    """
    cross = np.asarray(cross_moment, dtype=np.float64)
    n_a, n_b = cross.shape
    if n_a != n_b:
        raise TransportError(f"An orthogonal map needs equal widths, got {n_a} and {n_b} units.", widths=(n_a, n_b))
    if fixed is None:
        u, _, vt = np.linalg.svd(cross)
        return TransportMap.from_orthogonal(u @ vt)
    f = np.asarray(fixed, dtype=np.float64) / np.linalg.norm(fixed)
    basis = complement_basis(f)
    u, _, vt = np.linalg.svd(basis.T @ cross @ basis)
    return TransportMap.from_orthogonal(basis @ (u @ vt) @ basis.T + np.outer(f, f))


def complement_basis(direction: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n x n-1) of the vectors orthogonal to the unit vector `direction`."""
    n = len(direction)
    # QR of [direction, I]: the first column spans the direction, the next n-1 its complement
    q, _ = np.linalg.qr(np.concatenate([direction[:, None], np.eye(n)], axis=1)[:, :n])
    return q[:, 1:]


def reduced_cost(cost: np.ndarray) -> np.ndarray:
    """The cost minus its row minima, then minus its column minima.

    Constants per row or column do not change any transport plan (the marginals are fixed), but they make
    every row and column hold a zero, so the Sinkhorn kernel exp(-cost/reg) never underflows to an all-zero
    row and the fast (non-log) Sinkhorn iterations stay finite even at small reg.
    """
    reduced = cost - cost.min(axis=1, keepdims=True)
    reduced -= reduced.min(axis=0, keepdims=True)  # in place: large spaces are solved several at once
    return reduced


def _sinkhorn(
    cost: np.ndarray,
    reg: float,
    mu: np.ndarray,
    nu: np.ndarray,
    max_iter: int,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """POT's Sinkhorn on its torch backend in float32 (several times faster than numpy float64 on CPU, and the
    same code runs on `device`, e.g. a GPU), falling back to the stabilised float64 variant on the CPU if the
    fast one overflows."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = (
            ot.sinkhorn(
                torch.from_numpy(mu.astype(np.float32)).to(device),
                torch.from_numpy(nu.astype(np.float32)).to(device),
                torch.from_numpy(cost.astype(np.float32)).to(device),
                float(reg),
                method="sinkhorn",
                numItermax=max_iter,
                stopThr=SINKHORN_TOL,
            )
            .double()
            .cpu()
            .numpy()
        )
        if not np.isfinite(plan).all() or plan.sum() <= 0:
            plan = ot.sinkhorn(
                mu, nu, cost, reg, method="sinkhorn_stabilized", numItermax=max_iter, stopThr=SINKHORN_TOL
            )
    for warning in caught:
        logger.debug("Sinkhorn (n=%dx%d, reg=%.3g): %s", *cost.shape, reg, warning.message)
    return _project_marginals(plan, mu, nu)


def cost_scale(cost: np.ndarray) -> float:
    """Typical margin by which a unit's best match beats its second best (median over rows).

    Sinkhorn's softness depends on reg relative to these margins, not to the cost's maximum, so scaling reg
    by this gap gives comparable softness across spaces and models. When the anchor is k times wider, each
    parent unit is expected to spread over its k best matches, so the margin is the k-th to (k+1)-th best.
    """
    n_a, n_b = cost.shape
    if n_b < 2:
        return float(np.abs(cost).max()) or 1.0
    k = min(max(round(n_b / n_a), 1), n_b - 1)
    smallest = np.partition(cost, k, axis=1)[:, : k + 1]
    smallest.sort(axis=1)
    gap = float(np.median(smallest[:, k] - smallest[:, k - 1]))
    if gap > 0:
        return gap
    spread = float(cost.std())
    return spread if spread > 0 else 1.0


def plan_entropy(plan: np.ndarray) -> float:
    """Shannon entropy (nats) of a coupling."""
    return float(entr(plan).sum())  # entr(p) = -p log p, and 0 at p = 0: one temporary the size of the plan


def softness(entropy: float, n_a: int, n_b: int) -> float:
    """Entropy rescaled to [0, 1]: 0 for a hard matching (entropy log max(n)), 1 for the uniform plan."""
    hard, flat = math.log(max(n_a, n_b)), math.log(n_a * n_b)
    if flat <= hard:
        return 0.0
    return float(min(max((entropy - hard) / (flat - hard), 0.0), 1.0))


def _project_marginals(plan: np.ndarray, mu: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """Sinkhorn stops at a tolerance; rescale columns so the anchor-side marginal is exact (no unit dropped)."""
    column_mass = plan.sum(axis=0)
    column_mass[column_mass <= 0] = 1.0
    plan *= (nu / column_mass)[None, :]  # in place: the plans given here are the solver's own arrays
    return plan
