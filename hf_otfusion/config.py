"""`FusionConfig`: every choice that defines a fusion, serialisable so the checkpoint can record it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .config_fields import NumberRule, check_numbers, strict_from_dict
from .errors import FusionError, InvalidConfigError

#: refinement steps of `FusionConfig(quality="best")` when `refine_steps` is not given: from the data-free rotations,
#: 500 / 1000 / 2000 steps gave 86.67 / 86.61 / 86.89 % (ViT) and 86.27 / 86.53 / 86.60 % (DeiT) one-shot
#: (`benchmarks/results/quality.md`, `quality_refine_options/free_start_2000/`); 1000 is a minute or two of CPU for
#: these small models
BEST_REFINE_STEPS = 1000

#: the options that only shape refinement (`refine_steps` > 0)
_REFINE_OPTIONS = ("refine_permutations", "refine_norms", "refine_weights", "refine_invertible")

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("ot", "vanilla", "interpolate", "task-arithmetic", "regmean"),
    "align": ("none", "ot"),
    "cost": ("activations", "weights"),
    "solver": ("exact", "sinkhorn"),
    "reg_mode": ("relative", "absolute"),
    "residual": ("auto", "shared", "mean", "orthogonal"),
    "heads": ("aware", "cross"),
    "activation_cost": ("euclidean", "correlation"),
    "tokens": ("all", "first"),
    "marginals": ("uniform", "importance"),
    "repair": ("none", "residual", "all"),
    "within_heads": ("auto", "permutation", "orthogonal"),
    "task_vector": ("plain", "ties", "dare"),
    "quality": ("default", "best", "closed-form"),
    "regmean_inputs": ("parents", "fused"),
}


@dataclass
class FusionConfig:
    """How to align and average the parents.

    Args:
        method: `ot` aligns every parent onto the anchor before averaging; `vanilla` averages as they are.
            For fine-tunes of one base (see `hf_otfusion.methods.same_base`): `interpolate` (the weighted average),
            `task-arithmetic` (base + scale * sum of task vectors) or `regmean` (closed-form least-squares
            merge of every linear layer from the Gram matrices of its inputs on the alignment data). `regmean`
            also merges parents trained apart once OT aligns them (`align="ot"`; `quality="closed-form"`).
        align: `ot` aligns the parents with OT (the options below) before a same-base method; `none` merges
            them as they are. `method="ot"` always aligns.
        base: the parents' shared ancestor for `task-arithmetic`: a local checkpoint or Hub id (`REPO[@rev]`).
        scale: λ of task arithmetic, θ = θ_base + λ Σ_k w_k (θ_k − θ_base), w_k = `weights` or 1.
        regmean_alpha: RegMean's scaling of the Gram matrices' off-diagonal entries, in [0, 1] (1 = plain
            least squares; smaller is more regularised, 0 = per-input weighted averaging).
        regmean_inputs: which inputs RegMean fits each linear layer on. `parents`: each parent's own inputs
            (RegMean as published). `fused`: the inputs the fused model itself gives the layer, layer after layer
            in flow order, each fitted to its aligned parents' outputs on the same tokens, so that a layer corrects
            the error the layers below it left (`methods.fused_inputs`; a small fixed ridge towards the average
            takes the place of `regmean_alpha`, which it does not read). It costs about `layers / 2` passes of
            every model over the alignment data instead of one. On the committed pairs it is the most accurate
            fusion without training on ViT, DeiT and the wider ViT (`benchmarks/results/quality.md`), and
            `quality="closed-form"` uses it.
        task_vector: how `task-arithmetic` treats the task vectors τ_k = θ_k − θ_base, tensor by tensor, against
            the interference of parents that move an entry in opposite directions or pile up small redundant
            updates: `plain` adds the w_k τ_k as they are; `ties` (TIES-Merging, Yadav et al. 2023) trims each
            w_k τ_k to its `density` fraction of largest magnitudes, elects each entry's sign as that of the
            trimmed sum and takes the mean of the trimmed entries of that sign, θ = θ_base + `scale` × that mean
            (a mean, not a sum: `scale` 1 moves about as far as one parent did); `dare` (DARE, Yu et al. 2024)
            drops each entry of τ_k with probability 1 − `density`, rescales the rest by 1/`density` (so the
            expectation is kept) and sums them as `plain` does. Needs `method="task-arithmetic"`.
        density: fraction of each task vector kept by `task_vector="ties"` (the ⌈density · n⌉ largest
            magnitudes of each tensor, plus any tied with the smallest of them) or `"dare"` (the probability
            of keeping an entry); 1 keeps everything.
        seed: seed of DARE's random drop masks; each parent's tensor draws its own mask from a generator
            seeded by (seed, parent index, parameter name), so the result does not depend on the order or
            number of processes. Only read by `task_vector="dare"`.
        cost: `activations` compares units by their outputs on alignment data; `weights` is data-free and
            compares unit weight vectors after their inputs were aligned.
        solver: `exact` gives hard permutations (POT `emd`, or a linear assignment for equal widths);
            `sinkhorn` gives soft couplings regularised by `reg` (POT's Sinkhorn on the reduced cost; nearly
            hard plans need many iterations, capped by `sinkhorn_max_iter`, after which the anchor-side
            marginal is projected exactly).
        reg: Sinkhorn regularisation. With `reg_mode="relative"` it is a multiple of the cost's typical
            best-vs-second-best gap, so the same value gives similar softness on any cost scale.
        reg_mode: `relative` (default) or `absolute` (`reg` used as is, on the raw cost).
        residual: `shared` solves one residual map from all residual-stream sources pooled; `mean` solves one
            map per source and averages them (the paper's averaging of incoming maps); `orthogonal` (pre-LN
            architectures: ViT, DeiT) folds every parent's LayerNorms into their readers and centres the writers
            of the residual stream, an exact rewrite after which the stream can be rotated, then aligns it with
            one rotation per parent from the stream's activation statistics (see `hf_otfusion.engine.reparameterise`),
            or, with `cost="weights"`, data-free by Procrustes on the weights that hold or read the stream, alternated
            with the other spaces' weight matching (`rotation_rounds`).
            The fused model's LayerNorms then hold weight 1 and bias 0. `auto`
            (default) is `orthogonal` wherever it applies (a pre-LN spec, either cost, the exact solver with
            uniform marginals, `method="ot"`, no `target`, equal widths) and `shared` elsewhere; `fuse` records
            what it resolved to. With `align="ot"` before a same-base method `orthogonal` is available when
            asked for (with `within_heads="orthogonal"`: RegMean after rotations lifts the independently trained
            ViT pair of `benchmarks/results/quality.md` from 77.6 to 80.5 %), and the parents are then merged
            reparameterised, RegMean fitting each layer on the inputs it reads there. `auto` keeps permutations
            there: fine-tunes of one base are near the identity map, which a permutation recovers exactly and
            a rotation fitted to their small differences does not; the `closed-form` preset, meant for parents
            trained apart, rotates.
        heads: `aware` matches whole heads first, then dimensions within matched heads (Q and K share a map,
            V and O share a map); `cross` aligns all H*d_head dimensions as one space, as the reference does.
        activation_cost: ground cost between unit activations: `euclidean` (mean squared difference) or
            `correlation` (1 - Pearson correlation).
        tokens: which token positions feed activation statistics: `all` non-padding tokens or only the
            `first` (CLS) token.
        tokens_per_sample: with `tokens="all"`, keep at most this many evenly spaced non-padding tokens of
            each sample (its first token always among them); `None` keeps them all. The co-moment products
            of the activation pass scale with the token count while the forward passes do not, so this
            trades a little estimation noise for a much cheaper pass on long sequences.
        anchor: index of the parent whose basis and config the fused model takes.
        target: fuse into a narrower shape than the anchor's (compression): config sizes such as
            `{"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4}`, or the same as a string
            `"hidden_size=48,intermediate_size=96,num_attention_heads=4"` (the CLI's `--target`). The fused
            model is the anchor's class with these config values; see `hf_otfusion.methods.target`. `None` keeps the
            anchor's shape.
        marginals: mass of each unit in the OT problems between spaces of different widths: `uniform`, or
            `importance` (mean squared activation, or squared weight norm without data), so that heavy units
            keep their own partners and light ones are merged first.
        within_heads: after whole heads are matched, align the dims inside each matched pair of heads by a
            `permutation` (an exact assignment) or an `orthogonal` rotation (Procrustes on the within-head cross
            moments of the activations, or data-free of the weights: one rotation shared by Q and K, another by V
            and O, which leave the function unchanged); with `orthogonal`, heads are matched on the cost of their
            best rotation. Needs `heads="aware"`, `solver="exact"`, uniform marginals and equal head sizes;
            `auto` (default) is `orthogonal` wherever it applies and `permutation` elsewhere.
        rotation_rounds: rounds of the data-free residual rotation (`cost="weights"` with `residual` orthogonal):
            the first takes each parent's rotation from the tensors that need no other map (embeddings, biases),
            each further one from every tensor of the stream once the other spaces were matched in the last
            rotation's basis, and matches them again. 2 (default) did best on the committed ViT, DeiT and wider
            ViT pairs (`benchmarks/results/map_variants.md`); each round costs one weight matching of every space
            (at ViT-B size 1 round takes about as long as permutations alone, 2 about twice as long).
        refine_steps: after the closed-form maps, this many Adam steps on the alignment data that rotate every
            orthogonal map further (residual and within-head rotations; permutations stay) so that the average of
            the aligned parents matches the parents' ensemble (KL divergence of the output distributions, no
            labels); every fifth batch is held back and the best maps on it are kept (see
            `hf_otfusion.engine.refine`). 0 (default) turns it off. Needs alignment data, a model with logits and
            orthogonal maps, solved from either cost (with `cost="weights"`, refinement starts from the data-free
            rotations).
        refine_lr: Adam's learning rate for `refine_steps`.
        refine_permutations: with `refine_steps`, also let the FFN units' permutations change during refinement
            (a hard permutation forward, a straight-through gradient to learned scores; heads and the residual
            stream keep theirs). Off by default.
        refine_norms: with `refine_steps`, also learn the fused model's LayerNorm weights and biases (the output
            norm excepted), started at their average: a learned repair of each norm's per-channel scale and shift.
            The result is then an average of aligned parents with learned norms. Off by default.
        refine_weights: with `refine_steps`, also learn each parent's averaging weight per layer (and for the
            embeddings and the head), started at `weights`: the fused model stays a weighted average of the
            aligned parents, with weights chosen on the alignment data. Off by default.
        refine_invertible: with `refine_steps`, the map that V and O share inside each matched pair of heads
            becomes any invertible basis change (V → AᵀV, O → OA⁻ᵀ keep what the head computes) instead of a
            rotation, learned from the closed-form rotation; queries and keys keep rotations. Needs
            `within_heads` orthogonal. Off by default.
        quality: a preset. `default` changes nothing. `best` fits two candidates on the same four of every five
            alignment batches and keeps the one with the lower loss on the fifth: the cross-entropy on the data's
            labels when it has them (a `labels` or `label` column the model takes), else the KL divergence from the
            parents' ensemble (`FusionResult.choice`, the card and the log say which, and by how much). One
            candidate is the maps solved from the weights (`cost="weights"`, the data-free rotations) refined on
            the data with learned layer weights (`refine_weights=True`) for `refine_steps` steps, 1000
            (`BEST_REFINE_STEPS`) when it is 0; the other is `closed-form` below (`closed_form_candidate`). On the
            committed pairs of `benchmarks/results/quality.md` it keeps the refinement on ViT and DeiT (the most
            accurate one-shot rows there) and the closed form on BERT. An explicit `refine_steps` is kept, and
            `cost` is set whatever it was (to refine from activation maps, set `refine_steps` and `refine_weights`
            instead of the preset). With a `target` shape only the refinement runs (RegMean keeps the anchor's
            widths). It needs alignment data, a model with logits and `method="ot"`; the fields recorded are the
            refinement's, whichever candidate is kept.
            `closed-form` is the most accurate fusion without a training step on the committed pairs: the maps
            solved from the weights (`cost="weights"`, with both rotations where they are exact), then RegMean on
            the fused model's own inputs (`method="regmean"`, `align="ot"`, `regmean_inputs="fused"`: each linear
            layer, in flow order, fitted by least squares to its aligned parents' outputs on the inputs the fused
            layers below it give it). Repair stays off: after this fit it lowered accuracy. Tens of seconds on
            these models. It needs alignment data and `method` left at `ot` (or `regmean`), and no `refine_steps`.
            A preset sets its fields whatever they were; the resolved fields are what cards and job files record.
        repair: after averaging, move each fused unit's activation mean and standard deviation on the
            alignment data to the weighted average of its aligned parent units' (REPAIR, Jordan et al. 2023):
            averaging imperfectly correlated units shrinks their variance. `residual` repairs the modules that
            write into the residual stream (embeddings, attention output, FFN output), `all` also the FFN
            pre-activations (every site the spec's `repair` section lists); the correction is folded into each
            module's weight and bias, site by site in flow order. Needs alignment data; `none` turns it off.
            It also follows `method="regmean"`, whose least-squares layers keep more of the parents' variance
            than an average but not all of it.
        weights: one averaging weight per parent (normalised to sum to 1); `None` means uniform.
        batch_size: batch size of the activation pass.
        num_samples: cap on the number of alignment samples used (`None` = all).
        sinkhorn_max_iter / emd_max_iter: solver iteration caps.
    """

    #: the numeric fields' rules (set below the class), checked in `__post_init__` and shown in `--help`
    number_rules: ClassVar[dict[str, NumberRule]]

    method: str = "ot"
    align: str = "none"
    base: str | None = None
    scale: float = 1.0
    regmean_alpha: float = 0.9
    regmean_inputs: str = "parents"
    task_vector: str = "plain"
    density: float = 1.0
    seed: int = 0
    cost: str = "activations"
    solver: str = "exact"
    reg: float = 0.1
    reg_mode: str = "relative"
    residual: str = "auto"
    heads: str = "aware"
    activation_cost: str = "euclidean"
    tokens: str = "all"
    tokens_per_sample: int | None = None
    anchor: int = 0
    target: dict[str, int] | None = None
    marginals: str = "uniform"
    repair: str = "none"
    within_heads: str = "auto"
    rotation_rounds: int = 2
    refine_steps: int = 0
    refine_lr: float = 0.01
    refine_permutations: bool = False
    refine_norms: bool = False
    refine_weights: bool = False
    refine_invertible: bool = False
    quality: str = "default"
    weights: list[float] | None = None
    batch_size: int = 8
    num_samples: int | None = None
    sinkhorn_max_iter: int = 1000
    emd_max_iter: int = 10_000_000

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidConfigError(
                    f"FusionConfig.{name}={value!r} is not one of {list(allowed)}.", field=name, value=value
                )
        check_numbers(self, _FUSION_NUMBERS)
        if self.quality == "best":
            self._apply_best_quality()
        elif self.quality == "closed-form":
            self._apply_closed_form_quality()
        if self.base is not None and not isinstance(self.base, str):
            raise InvalidConfigError(
                f"FusionConfig.base must be a checkpoint path or Hub id, got {self.base!r}.",
                field="base",
                value=self.base,
            )
        if self.base and self.method != "task-arithmetic":
            raise InvalidConfigError(
                f"base={self.base!r} is only used by method='task-arithmetic', not {self.method!r}.",
                field="base",
                value=self.base,
            )
        if self.regmean_inputs != "parents" and self.method != "regmean":
            raise InvalidConfigError(
                f"regmean_inputs={self.regmean_inputs!r} chooses the inputs of RegMean's least squares, not of "
                f"method={self.method!r}; use method='regmean' (align='ot' for parents trained apart), or leave "
                "regmean_inputs at 'parents'.",
                field="regmean_inputs",
                value=self.regmean_inputs,
            )
        if self.regmean_inputs == "fused" and self.regmean_alpha != 0.9:
            raise InvalidConfigError(
                f"regmean_alpha={self.regmean_alpha} shapes RegMean on the parents' inputs; with "
                "regmean_inputs='fused' a fixed ridge towards the average regularises instead. Leave regmean_alpha "
                "at 0.9, or use regmean_inputs='parents'.",
                field="regmean_alpha",
                value=self.regmean_alpha,
            )
        if self.task_vector != "plain" and self.method != "task-arithmetic":
            raise InvalidConfigError(
                f"task_vector={self.task_vector!r} reshapes the task vectors of method='task-arithmetic' (with a "
                f"base), not of method={self.method!r}; use method='task-arithmetic' or task_vector='plain'.",
                field="task_vector",
                value=self.task_vector,
            )
        if self.density != 1 and self.task_vector == "plain":
            raise InvalidConfigError(
                f"density={self.density} is only read by task_vector='ties' or 'dare' (method='task-arithmetic'); "
                "set one of them, or leave density at 1.",
                field="density",
                value=self.density,
            )
        if self.seed != 0 and self.task_vector != "dare":
            raise InvalidConfigError(
                f"seed={self.seed} only seeds the drop masks of task_vector='dare'; set task_vector='dare' "
                "(method='task-arithmetic'), or leave seed at 0.",
                field="seed",
                value=self.seed,
            )
        if self.rotation_rounds != 2 and self.cost != "weights":
            raise InvalidConfigError(
                f"rotation_rounds={self.rotation_rounds} shapes the data-free residual rotation only (cost='weights'); "
                "with activation costs the rotation is solved once from the statistics. Leave it at 2.",
                field="rotation_rounds",
                value=self.rotation_rounds,
            )
        if self.align == "ot" and self.method == "vanilla":
            raise InvalidConfigError(
                "align='ot' contradicts method='vanilla' (no alignment); use method='ot' instead.",
                field="align",
                value=self.align,
            )
        if self.residual == "orthogonal" and (self.target is not None or "ot" not in (self.method, self.align)):
            raise InvalidConfigError(
                "residual='orthogonal' rotates what OT aligns: it needs method='ot' (or align='ot' before a same-base "
                "method) and no target shape.",
                field="residual",
                value=self.residual,
            )
        if self.within_heads == "orthogonal" and (
            self.heads != "aware" or self.solver != "exact" or self.marginals != "uniform"
        ):
            raise InvalidConfigError(
                "within_heads='orthogonal' rotates dims inside matched heads: it needs heads='aware', solver='exact' "
                "and marginals='uniform'.",
                field="within_heads",
                value=self.within_heads,
            )
        if self.refine_steps and self.method != "ot":
            raise InvalidConfigError(
                f"refine_steps refines the maps of OT fusion: it needs method='ot', got {self.method!r}.",
                field="refine_steps",
                value=self.refine_steps,
            )
        refine_options = [name for name in _REFINE_OPTIONS if getattr(self, name)]
        if refine_options and not self.refine_steps:
            raise InvalidConfigError(
                f"{', '.join(refine_options)} shape(s) the learned refinement, which refine_steps=0 turns off: set "
                "refine_steps (e.g. 500), or drop those options.",
                field=refine_options[0],
                value=True,
            )
        if self.refine_invertible and self.within_heads not in ("auto", "orthogonal"):
            raise InvalidConfigError(
                f"refine_invertible refines the within-head rotations of V/O, and within_heads={self.within_heads!r} "
                "makes none: use within_heads='orthogonal' (or auto).",
                field="refine_invertible",
                value=True,
            )
        if self.repair != "none" and self.method not in ("ot", "vanilla", "regmean"):
            raise InvalidConfigError(
                f"repair={self.repair!r} follows OT or vanilla averaging or RegMean, not method={self.method!r}.",
                field="repair",
                value=self.repair,
            )
        if self.target is not None:
            self.target = parse_target(self.target)
            if self.method != "ot":
                raise InvalidConfigError(
                    f"target={self.target} needs method='ot' (widths change); got {self.method!r}.",
                    field="target",
                    value=self.target,
                )
        if self.weights is not None:
            if not isinstance(self.weights, list | tuple):
                raise InvalidConfigError(
                    f"FusionConfig.weights must be a list of numbers, one per parent, got {self.weights!r}.",
                    field="weights",
                    value=self.weights,
                )
            weight = NumberRule(float)
            self.weights = [weight.check(f"FusionConfig.weights[{k}]", w) for k, w in enumerate(self.weights)]
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise InvalidConfigError(
                    f"FusionConfig.weights must be non-negative with a positive sum: {self.weights}.",
                    field="weights",
                    value=self.weights,
                )

    def _apply_best_quality(self) -> None:
        """Sets the fields of `quality="best"`: refinement with learned layer weights from the data-free closed
        form (see the class docstring)."""
        if self.method != "ot":
            raise InvalidConfigError(
                f"quality='best' refines the maps of OT fusion: it needs method='ot', got method={self.method!r}; "
                "drop quality='best' (--quality) or method.",
                field="quality",
                value=self.quality,
            )
        self.cost = "weights"  # the closed-form start: refinement went further from it than from activations
        self.refine_steps = self.refine_steps or BEST_REFINE_STEPS
        self.refine_weights = True

    def _apply_closed_form_quality(self) -> None:
        """Sets the fields of `quality="closed-form"`: data-free maps, RegMean on the fused inputs (see the class
        docstring); `resolved` rotates under it where that is exact, as for `method="ot"`."""
        if self.method not in ("ot", "regmean") or self.refine_steps:
            got = f"refine_steps={self.refine_steps}" if self.refine_steps else f"method={self.method!r}"
            raise InvalidConfigError(
                f"quality='closed-form' merges the aligned parents by RegMean without training, got {got}; drop "
                "quality='closed-form' (--quality), or the other option.",
                field="quality",
                value=self.quality,
            )
        self.method, self.align, self.cost, self.repair = "regmean", "ot", "weights", "none"
        self.regmean_inputs = "fused"

    def closed_form_candidate(self) -> FusionConfig:
        """What `quality="best"` weighs its refinement against: this config under the `closed-form` preset, its
        refinement fields back at their defaults (the rest, e.g. `regmean_alpha` or `batch_size`, kept)."""
        defaults = FusionConfig()
        unrefined = {name: getattr(defaults, name) for name in ("refine_steps", "refine_lr", *_REFINE_OPTIONS)}
        return dataclasses.replace(self, quality="closed-form", **unrefined)

    def resolved(self, rotatable: bool, equal_widths: bool) -> FusionConfig:
        """This config with `residual="auto"` and `within_heads="auto"` decided for parents whose spec is (or is not)
        `rotatable` (pre-LN, `residual_norms` listed) and whose widths are (or are not) equal to the anchor's."""
        # OT fusion rotates where it can; OT before a same-base method only under the closed-form preset (`residual`)
        aligns = self.method == "ot" or (self.align == "ot" and self.quality == "closed-form")
        aligns = aligns and self.target is None and equal_widths
        aligns = aligns and self.solver == "exact" and self.marginals == "uniform"  # soft plans stay as asked
        residual, within_heads = self.residual, self.within_heads
        if residual == "auto":  # from activations, or data-free from weights
            residual = "orthogonal" if aligns and rotatable else "shared"
        if within_heads == "auto":  # from activations, or data-free from weights
            within_heads = "orthogonal" if aligns and self.heads == "aware" else "permutation"
        return dataclasses.replace(self, residual=residual, within_heads=within_heads)

    @property
    def aligns_on_activations(self) -> bool:
        """Whether OT maps are solved from activation costs (`method="ot"`, or `align="ot"` before a same-base
        merge, with `cost="activations"`): the alignment itself reads the data."""
        return (self.method == "ot" or self.align == "ot") and self.cost == "activations"

    @property
    def needs_data(self) -> bool:
        """Whether this fusion reads alignment data (activation costs, RegMean's input Gram matrices, repair or
        refinement)."""
        reads = self.method == "regmean" or self.repair != "none" or self.refine_steps > 0
        return self.aligns_on_activations or reads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/YAML-safe), the form written next to the checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FusionConfig:
        """Builds a config from a dict, rejecting unknown keys so that typos do not pass silently."""
        return strict_from_dict(cls, values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def statistics_options(self) -> dict[str, Any]:
        """The `collect_statistics` keyword arguments this config sets: which tokens, batching, sample cap."""
        return {
            "tokens": self.tokens, "tokens_per_sample": self.tokens_per_sample, "batch_size": self.batch_size,
            "num_samples": self.num_samples,
        }  # fmt: skip

    def normalised_weights(self, num_parents: int) -> list[float]:
        """The averaging weight of each parent, summing to 1."""
        if self.weights is None:
            return [1.0 / num_parents] * num_parents
        if len(self.weights) != num_parents:
            raise InvalidConfigError(
                f"FusionConfig.weights has {len(self.weights)} entries for {num_parents} parents; "
                "give one weight per parent or None for uniform weights.",
                field="weights",
                value=self.weights,
            )
        total = sum(self.weights)
        return [w / total for w in self.weights]


# numeric FusionConfig fields: type and range (a new field is a new row)
_FUSION_NUMBERS = {
    "scale": NumberRule(float),
    "regmean_alpha": NumberRule(float, 0, 1),
    "density": NumberRule(float, 0, 1, low_open=True),
    "seed": NumberRule(int, 0, 2**32 - 1),
    "reg": NumberRule(float, 0, low_open=True),
    "tokens_per_sample": NumberRule(int, 1, optional=True),
    "anchor": NumberRule(int, 0),
    "batch_size": NumberRule(int, 1),
    "num_samples": NumberRule(int, 1, optional=True),
    "sinkhorn_max_iter": NumberRule(int, 1),
    "emd_max_iter": NumberRule(int, 1),
    "rotation_rounds": NumberRule(int, 1),
    "refine_steps": NumberRule(int, 0),
    "refine_lr": NumberRule(float, 0, low_open=True),
}


def parse_target(value: Any) -> dict[str, int]:
    """`{"hidden_size": 48, ...}` from a dict or from `"hidden_size=48,..."`, with positive integer sizes."""
    if isinstance(value, str):
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        if not all(entry.count("=") == 1 for entry in entries):
            raise InvalidConfigError(
                f"FusionConfig.target={value!r} must look like 'hidden_size=48,intermediate_size=96,"
                "num_attention_heads=4' (comma-separated KEY=INT config sizes).",
                field="target",
                value=value,
            )
        value = {key: size for key, _, size in (entry.partition("=") for entry in entries)}
    if not isinstance(value, dict) or not value:
        raise InvalidConfigError(
            f"FusionConfig.target must be a non-empty mapping of config sizes, got {value!r}.",
            field="target",
            value=value,
        )
    target = {}
    for key, size in value.items():
        try:
            target[str(key).strip()] = int(str(size).strip())
        except ValueError:
            raise InvalidConfigError(
                f"FusionConfig.target[{key!r}]={size!r} is not an integer size.", field=f"target[{key!r}]", value=size
            ) from None
        if target[str(key).strip()] < 1:
            raise InvalidConfigError(
                f"FusionConfig.target[{key!r}] must be >= 1, got {size!r}.", field=f"target[{key!r}]", value=size
            )
    return target


FusionConfig.number_rules = _FUSION_NUMBERS


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (JSON is YAML): a job, a `FusionConfig` or a `FinetuneConfig`."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FusionError(f"Cannot read the fusion config {path}: {error}") from error
    if not isinstance(values, dict):
        raise FusionError(f"{path} must hold a mapping of FusionConfig fields, not {type(values).__name__}.")
    return values
