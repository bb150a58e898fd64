"""`align_parents` and `otfusion-hub align`: every parent in the anchor's basis, function-preserving, mergeable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from conftest import build, inputs_for, outputs
from datasets import Dataset
from hub_utils import client_env, run_cli, run_python
from huggingface_hub import ModelCard

from hf_otfusion import FusionConfig, align_parents, fuse, permute_model
from hf_otfusion.alignment import align_models
from hf_otfusion.cli import main
from hf_otfusion.engine.permute import rotate_model
from hf_otfusion.errors import FusionError
from hf_otfusion.hub.server import HubServer

OUTPUT_TOLERANCE = 1e-5  # max |logits of the aligned parent - logits of the parent|
PARAMETER_TOLERANCE = 1e-6  # max |mean of aligned parents - fused| per tensor, relative to max(1, max |fused|)


def alignment_data(model, samples: int = 64) -> Dataset:
    return Dataset.from_dict({k: v.numpy() for k, v in inputs_for(model, batch=samples, seed=1).items()})


def max_output_difference(aligned, parents, inputs) -> float:
    return max(
        (outputs(a, inputs) - outputs(p, inputs)).abs().max().item() for a, p in zip(aligned, parents, strict=True)
    )


def max_parameter_difference(aligned, fused) -> float:
    """Max over tensors of |equal-weight mean of the aligned parents - fused| / max(1, max |fused|)."""
    fused_params = dict(fused.named_parameters())
    worst = 0.0
    for name, target in fused_params.items():
        mean = torch.stack([dict(model.named_parameters())[name].double() for model in aligned]).mean(0)
        scale = max(1.0, target.abs().max().item())
        worst = max(worst, (mean - target.double()).abs().max().item() / scale)
    return worst


def test_aligned_bert_parents_keep_their_logits_and_line_up_with_the_anchor():
    anchor, other, third = build("bert-seqcls", 0), build("bert-seqcls", 1), build("bert-seqcls", 2)
    inputs = inputs_for(anchor)
    parents = [anchor, other, third]
    alignment = align_models(parents, FusionConfig(cost="weights"), progress=False)
    difference = max_output_difference(alignment.models, parents, inputs)
    print(f"bert permutations: max |logits difference| {difference:.3g}")
    assert difference <= OUTPUT_TOLERANCE
    assert set(alignment.map_kinds()["mlp"]) == {"permutation"} and set(alignment.map_kinds()["residual"]) == {
        "permutation"
    }
    moved = dict(alignment.models[1].named_parameters())
    original = dict(other.named_parameters())
    assert any(not torch.equal(moved[name], original[name]) for name in moved)  # the maps did move the parent
    # a permuted copy of the anchor is aligned back onto the anchor's weights themselves
    (_, back) = align_parents([anchor, permute_model(anchor, seed=4)], FusionConfig(cost="weights"), progress=False)
    anchor_params = dict(anchor.named_parameters())
    assert max((p - anchor_params[n]).abs().max().item() for n, p in back.named_parameters()) < 1e-6


@pytest.mark.parametrize("family", ["vit-cls", "deit-teacher"])
def test_rotated_vit_parents_keep_their_logits(family):
    anchor, other = build(family, 0), build(family, 1)
    inputs, data = inputs_for(anchor), alignment_data(anchor)
    parents = [anchor, other, rotate_model(other, seed=3)]
    alignment = align_models(parents, FusionConfig(residual="orthogonal"), data=data, progress=False)
    difference = max_output_difference(alignment.models, parents, inputs)
    print(f"{family} rotations: max |logits difference| {difference:.3g}")
    assert difference <= OUTPUT_TOLERANCE
    assert alignment.map_kinds()["residual"] == ["orthogonal"]
    assert alignment.config.residual == "orthogonal"
    # the anchor is re-saved folded: its inner LayerNorms hold weight 1, its output norm is its own
    folded = dict(alignment.models[0].named_parameters())
    assert all(torch.all(p == 1) for n, p in folded.items() if "layernorm_before.weight" in n)


def test_refined_rotations_are_exact_and_keep_each_parents_logits():
    """Refined maps are written back in float64, so they count as exact rotations (float32 ones are off by ~1e-6)."""
    parents = [build("vit-cls", 0), build("vit-cls", 1)]
    inputs, data = inputs_for(parents[0]), alignment_data(parents[0], samples=80)
    alignment = align_models(parents, FusionConfig(refine_steps=30), data=data, progress=False)
    assert max_output_difference(alignment.models, parents, inputs) <= OUTPUT_TOLERANCE
    closed_form = align_models(parents, FusionConfig(), data=data, progress=False)
    residual, before = alignment.maps[1]["residual"].output_matrix(), closed_form.maps[1]["residual"].output_matrix()
    assert np.abs(residual.T @ residual - np.eye(len(residual))).max() < 1e-12
    assert np.abs(residual - before).max() > 1e-4  # refinement did move the rotation


@pytest.mark.parametrize(
    ("family", "config", "with_data"),
    [("bert-seqcls", FusionConfig(cost="weights"), False), ("bert-seqcls", FusionConfig(), True),
     ("vit-cls", FusionConfig(residual="orthogonal"), True), ("vit-cls", FusionConfig(), True),
     ("vit-cls", FusionConfig(refine_steps=10), True)],
    ids=["bert-weights", "bert-activations", "vit-orthogonal", "vit-auto", "vit-refined"],
)  # fmt: skip
def test_mean_of_aligned_parents_is_the_ot_fusion(family, config, with_data):
    parents = [build(family, 0), build(family, 1), build(family, 2)]
    data = alignment_data(parents[0]) if with_data else None
    aligned = align_parents(parents, config, data=data, progress=False)
    fused = fuse(parents, data=data, config=config, progress=False)
    difference = max_parameter_difference(aligned, fused)
    print(f"{family}: max relative |mean(aligned) - fused| {difference:.3g}")
    assert difference <= PARAMETER_TOLERANCE


def test_aligning_saved_parents_averages_nothing(tmp_path, monkeypatch):
    """`align_models` stops before `fuse`'s average (it was computed and dropped): the averaging step must not run,
    and each checkpoint is loaded once for the maps and once to be moved."""
    import hf_otfusion.fusion as fusion

    paths = [str(tmp_path / name) for name in ("a", "b")]
    for seed, path in enumerate(paths):
        build("vit-cls", seed).save_pretrained(path)

    def no_average(*args, **kwargs):
        raise AssertionError("align_models averaged the parents")

    loads = []
    monkeypatch.setattr(fusion, "average_into", no_average)
    monkeypatch.setattr(
        fusion,
        "load_parent",
        lambda source: loads.append(source) or T.ViTForImageClassification.from_pretrained(source),
    )
    alignment = align_models(paths, FusionConfig(cost="weights"), progress=False)
    assert len(alignment.models) == 2 and set(alignment.maps) == {1}
    assert sorted(loads) == paths  # the maps' loads; moving each parent loads it once more, outside `fusion`


@pytest.mark.parametrize(
    ("options", "fix"),
    [({"solver": "sinkhorn"}, "--solver exact"), ({"marginals": "importance"}, "--marginals uniform"),
     ({"residual": "mean"}, "--residual shared"), ({"heads": "cross"}, "--heads aware"),
     ({"repair": "all"}, "--repair"), ({"method": "vanilla"}, "method='ot'")],
)  # fmt: skip
def test_options_that_give_soft_maps_are_refused_with_the_fix(options, fix):
    parents = [build("bert-seqcls", 0), build("bert-seqcls", 1)]
    with pytest.raises(FusionError, match="function") as error:
        align_parents(parents, FusionConfig(cost="weights", **options), progress=False)
    assert fix in str(error.value)


def test_parents_of_other_widths_are_refused_after_the_solve():
    parents = [build("bert-seqcls", 0), build("bert-seqcls", 1, intermediate_size=64)]
    with pytest.raises(FusionError, match="soft coupling .*function-preserving; align parents of the anchor's"):
        align_parents(parents, FusionConfig(cost="weights"), progress=False)


def test_out_is_refused_when_it_exists_and_nothing_is_computed(tmp_path):
    out = tmp_path / "aligned"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FusionError, match="exists and is not empty"):
        align_parents([build("bert-seqcls", 0), build("bert-seqcls", 1)], FusionConfig(cost="weights"), out=out)
    assert (out / "keep").read_text() == "x"


@pytest.fixture
def saved_vit_parents(tmp_path):
    anchor, other = build("vit-cls", 0), build("vit-cls", 1)
    paths = [tmp_path / "parents" / "vit-a", tmp_path / "parents" / "vit-b"]
    for model, path in zip([anchor, other], paths, strict=True):
        model.save_pretrained(path)
        (path / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": False,
                    "image_mean": [0.5],
                    "image_std": [0.5],
                }
            )  # fmt: skip
        )
    data = tmp_path / "align-data"
    Dataset.from_dict({"pixel_values": inputs_for(anchor, batch=32, seed=1)["pixel_values"].numpy()}).save_to_disk(
        str(data)
    )
    return [anchor, other], paths, data


def test_cli_writes_loadable_documented_aligned_checkpoints(saved_vit_parents, tmp_path, capsys):
    models, paths, data = saved_vit_parents
    out = tmp_path / "aligned"
    argv = ["align", *map(str, paths), "--out", str(out), "--data", str(data), "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "residual: orthogonal" in printed and "mergekit" in printed
    assert sorted(p.name for p in out.iterdir()) == ["vit-a", "vit-b"]
    inputs = inputs_for(models[0])
    loaded = []
    for name in ("vit-a", "vit-b"):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md", "alignment_config.yaml", "config.json", "model.safetensors", "preprocessor_config.json"
        ]  # fmt: skip
        loaded.append(T.AutoModelForImageClassification.from_pretrained(folder).eval())
        card = ModelCard.load(folder / "README.md")
        assert set(card.data.tags) >= {"hf-otfusion", "aligned", "vit"}
        assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "transformers"
        assert "Function-preserving" in card.text and "mergekit-yaml config.yml" in card.text
        assert "merge_method: linear" in card.text and "  - model: vit-b" in card.text
        moved = "identity" if name == "vit-a" else "orthogonal"  # the anchor is never moved
        assert f"| residual | {moved} | orthogonal |" in card.text
    difference = max_output_difference(loaded, models, inputs)
    with capsys.disabled():
        print(f"cli (vit, rotations): max |logits difference| {difference:.3g}")
    assert difference <= OUTPUT_TOLERANCE
    assert "aligned onto" in ModelCard.load(out / "vit-b" / "README.md").text
    # an existing --out needs --overwrite; soft maps are refused before any work
    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--solver", "sinkhorn"]) == 2
    assert "use --solver exact" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["vit-a", "vit-b"]


UPLOAD = r"""
import json
from huggingface_hub import HfApi
from conftest import build

api = HfApi()
for repo, seed in (("ns/a", 0), ("ns/b", 1)):
    model = build("bert-seqcls", seed)
    model.save_pretrained(repo.split("/")[1])
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=repo.split("/")[1])
print("RESULT ok")
"""

CHECK = r"""
import torch
from transformers import AutoModelForSequenceClassification as Auto
from conftest import inputs_for, outputs

worst = 0.0
for name in ("a", "b"):
    parent = Auto.from_pretrained("ns/" + name).eval()
    inputs = inputs_for(parent)
    for aligned in (Auto.from_pretrained("ns/aligned-" + name).eval(), Auto.from_pretrained("out/" + name).eval()):
        worst = max(worst, (outputs(aligned, inputs) - outputs(parent, inputs)).abs().max().item())
print(f"RESULT {worst}")
"""


def test_hub_parents_are_aligned_written_and_pushed_one_repo_each(tmp_path):
    with HubServer(tmp_path / "store") as server:
        upload = tmp_path / "upload"
        upload.mkdir()
        proc = run_python(UPLOAD, client_env(server.url, tmp_path / "upload-home"), upload)
        assert proc.returncode == 0, proc.stderr[-4000:]
        env = client_env(server.url, tmp_path / "home")
        proc = run_cli(["align", "ns/a", "ns/b", "--out", "out", "--push-to-hub", "ns/aligned", "-q"], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("Pushed ") == 2
        assert "ns/aligned-a" in proc.stdout and "ns/aligned-b" in proc.stdout
        assert ModelCard.load(tmp_path / "out" / "b" / "README.md").data.base_model == "ns/b"
        proc = run_python(CHECK, env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
    difference = float(proc.stdout.split("RESULT ", 1)[1].split()[0])
    print(f"hub round trip (bert, permutations): max |logits difference| {difference:.3g}")
    assert difference <= OUTPUT_TOLERANCE
