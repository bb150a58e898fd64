"""`otfusion-hub fuse` on local checkpoints: flags equal FusionConfig fields, outputs are atomic, documented, safe."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from conftest import build, inputs_for, outputs, relative_error
from huggingface_hub import ModelCard
from safetensors import safe_open

from hf_otfusion import permute_model
from hf_otfusion.cli import main
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.methods.gram import mergeable_linears
from hf_otfusion.output.card import build_card_data
from hf_otfusion.output.provenance import Provenance

PREPROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": False,
    "image_mean": [0.5],
    "image_std": [0.5],
}


@pytest.fixture
def parents(saved_parents):
    return saved_parents


@pytest.fixture
def align_data(parents, tmp_path):
    from datasets import Dataset

    parent, _ = parents
    path = tmp_path / "align"
    Dataset.from_dict({"pixel_values": inputs_for(parent, batch=12)["pixel_values"].numpy()}).save_to_disk(str(path))
    return str(path)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_fuses_saved_parents_into_a_loadable_documented_checkpoint(parents, tmp_path, capsys):
    parent, paths = parents
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--cost", "weights", "--solver", "exact", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "fusion_config.yaml", "fusion_job.yaml", "fusion_provenance.json",
        "model.safetensors",
    ]  # fmt: skip
    assert yaml.safe_load((out / "fusion_config.yaml").read_text())["cost"] == "weights"
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    provenance = Provenance.load(out)
    for record, path in zip(provenance.parents, paths, strict=True):
        assert record["weight_files"][0]["sha256"] == sha256(tmp_path / path / "model.safetensors")
    assert provenance.outputs == {"model.safetensors": sha256(out / "model.safetensors")}
    assert provenance.command.startswith("otfusion-hub fuse ") and "--cost weights" in provenance.command
    assert {d["space"] for d in provenance.diagnostics} >= {"residual", "heads.0", "qk.1", "vo.0", "mlp.1"}
    assert "Fused model written to" in capsys.readouterr().out


def test_cli_activation_fusion_reads_a_saved_dataset(parents, align_data, tmp_path):
    parent, paths = parents
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--data", align_data, "--batch-size", "4", "-q"]) == 0
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent, seed=3)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    assert Provenance.load(out).alignment_data["num_rows"] == 12


def test_closed_form_preset_is_a_flag_and_records_its_fields(parents, align_data, tmp_path):
    parent, paths = parents
    out = tmp_path / "fused"
    flags = ["--data", align_data, "--batch-size", "4", "--quality", "closed-form", "-q"]
    assert main(["fuse", *paths, "--out", str(out), *flags]) == 0
    config = yaml.safe_load((out / "fusion_config.yaml").read_text())
    keys = ("quality", "method", "align", "cost", "regmean_inputs", "repair", "residual", "within_heads")
    recorded = tuple(config[k] for k in keys)
    assert recorded == ("closed-form", "regmean", "ot", "weights", "fused", "none", "auto", "auto")  # as given
    quality = Provenance.load(out).quality
    assert quality["map_kinds"]["residual"] == ["orthogonal"] and not quality["repair"]
    layers = len(mergeable_linears(parent))  # every linear layer, the classifier's too
    assert len(quality["refit"]) == layers
    assert all(layer["error_after"] < 1e-6 for layer in quality["refit"])  # a permuted copy: each layer refits exactly
    assert f"Refit on the fused inputs: {layers} linear layers" in (out / "README.md").read_text()
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()  # the anchor's plain class
    inputs = inputs_for(parent, seed=3)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4  # b is a permuted copy of a


def test_quality_options_are_flags_and_the_card_and_provenance_record_them(parents, align_data, tmp_path):
    parent, paths = parents
    out, again = tmp_path / "fused", tmp_path / "again"
    flags = [
        "--data",
        align_data,
        "--batch-size",
        "2",
        "--repair",
        "all",
        "--refine-steps",
        "6",
        "--refine-weights",
        "-q",
    ]
    assert main(["fuse", *paths, "--out", str(out), *flags]) == 0
    config = yaml.safe_load((out / "fusion_config.yaml").read_text())
    assert (config["repair"], config["refine_steps"], config["residual"]) == ("all", 6, "auto")
    assert config["refine_weights"] is True
    quality = Provenance.load(out).quality
    assert quality["map_kinds"]["residual"] == ["orthogonal"] and quality["refine"]["steps"] == 6
    assert len(quality["repair"]) == len(resolve_plan(parent).repair_sites)
    card = (out / "README.md").read_text()
    assert "Maps: " in card and "residual: orthogonal" in card and "Refinement: 6 steps" in card
    assert "Learned parent weights per layer group (parents in order): embeddings " in card
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()  # the anchor's plain class
    inputs = inputs_for(parent, seed=3)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4  # b is a permuted copy of a
    assert main(["fuse", *paths, "--out", str(again), "--config", str(out / "fusion_config.yaml"), *flags]) == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_fusion_config_yaml_rebuilds_the_checkpoint_byte_for_byte(parents, align_data, tmp_path):
    _, paths = parents
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--data", align_data, "--num-samples", "10", "--data-seed", "3", "-q"]
    assert main(["fuse", *paths, "--out", str(first), "--solver", "sinkhorn", "--reg", "0.05", *flags]) == 0
    config = str(first / "fusion_config.yaml")
    assert main(["fuse", *paths, "--out", str(second), "--config", config, *flags]) == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert yaml.safe_load((second / "fusion_config.yaml").read_text())["solver"] == "sinkhorn"
    assert Provenance.load(first).alignment_data["num_rows"] == 10


def test_a_job_file_with_parents_and_data_is_the_whole_fusion(parents, align_data, tmp_path, monkeypatch):
    parent, paths = parents
    monkeypatch.chdir(tmp_path)
    job = {
        "parents": paths, "out": "fused", "data": align_data, "data_seed": 3, "max_shard_size": "2GB",
        "config": {"solver": "sinkhorn", "reg": 0.05, "num_samples": 10, "batch_size": 4},
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["fuse", "--config", "job.yaml", "-q"]) == 0  # no parents, --out or --data on the command line
    recorded = yaml.safe_load((tmp_path / "fused" / "fusion_job.yaml").read_text())
    assert recorded["parents"] == [str(Path(p).resolve()) for p in paths]  # pinned: local parents resolved
    assert (recorded["data"], recorded["data_seed"], recorded["max_shard_size"]) == (align_data, 3, "2GB")
    assert recorded["config"]["solver"] == "sinkhorn" and recorded["config"]["num_samples"] == 10
    assert "overwrite" not in recorded and "command" not in recorded
    provenance = Provenance.load(tmp_path / "fused")
    assert provenance.job == recorded
    card = (tmp_path / "fused" / "README.md").read_text()
    assert "otfusion-hub fuse --config fusion_job.yaml --out fused" in card
    assert "[arXiv:2310.05719](https://arxiv.org/abs/2310.05719)" in card  # the method's paper, linked
    # the recorded job rebuilds the same bytes; flags override the file (here: only where to write)
    assert main(["fuse", "--config", "fused/fusion_job.yaml", "--out", "again", "-q"]) == 0
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
    # and so does the pinned command line the provenance records (with fusion_config.yaml beside it)
    words = shlex.split(provenance.reproduce)
    assert words[:2] == ["otfusion-hub", "fuse"] and "--data-seed" in words and "--max-shard-size" in words
    words[words.index("--config") + 1] = "fused/fusion_config.yaml"
    words[words.index("--out") + 1] = "third"
    assert main([*words[1:], "-q"]) == 0
    assert (tmp_path / "third" / "model.safetensors").read_bytes() == (
        tmp_path / "fused" / "model.safetensors"
    ).read_bytes()


def test_a_job_file_refuses_unknown_keys_and_keys_given_twice(parents, tmp_path, capsys):
    _, paths = parents
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"parents": paths, "out": str(tmp_path / "o"), "dat": "x"}))
    (tmp_path / "twice.yaml").write_text(yaml.safe_dump({"parents": paths, "reg": 0.1, "config": {"reg": 0.2}}))
    assert main(["fuse", "--config", str(tmp_path / "typo.yaml"), "-q"]) == 2
    assert "Unknown FuseJob key(s) ['dat']" in capsys.readouterr().err
    assert main(["fuse", "--config", str(tmp_path / "twice.yaml"), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "'reg' is given twice in the job" in capsys.readouterr().err
    assert main(["fuse", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert (
        "fuse needs parents: give PARENTS arguments, or `parents:` in a --config job file." in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_non_empty_out_and_keeps_it(parents, tmp_path, capsys):
    _, paths = parents
    out = tmp_path / "fused"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["fuse", *paths, "--out", str(out), "--cost", "weights", "-q"]) == 2
    assert "exists and is not empty; choose another path or pass --overwrite" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["fuse", *paths, "--out", str(out), "--cost", "weights", "-q", "--overwrite"]) == 0
    assert not (out / "precious.txt").exists()


def test_cli_reports_incompatible_parents_and_writes_nothing(tmp_path, capsys):
    build("vit-cls").save_pretrained(tmp_path / "a")
    build("vit-cls", num_hidden_layers=3).save_pretrained(tmp_path / "b")
    out = tmp_path / "fused"
    code = main(["fuse", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--cost", "weights", "-q"])
    assert code == 2
    assert "same depth" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".fused.*"))


def test_activation_fusion_without_data_fails_before_loading(parents, tmp_path, capsys):
    _, paths = parents
    assert main(["fuse", *paths, "--out", str(tmp_path / "fused"), "--cost", "activations", "-q"]) == 2
    assert "This fusion (cost=activations) needs alignment data: pass --data" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()


def test_a_cli_run_draws_one_bar_per_stage_and_says_written_to_once(parents, tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    _, paths = parents
    transformers_logging.enable_progress_bar()
    previous = transformers_logging.set_tqdm_hook(None)
    try:
        assert main(["fuse", *paths, "--out", str(tmp_path / "fused"), "--cost", "weights"]) == 0
    finally:
        transformers_logging.set_tqdm_hook(previous)
    captured = capsys.readouterr()
    assert "transport maps, parent 1" in captured.err  # the stages keep their bars
    assert "Loading weights" not in captured.err
    assert (captured.out + captured.err).lower().count("written to") == 1


def test_fuse_without_data_runs_data_free_and_says_how_to_use_data(parents, tmp_path, caplog):
    parent, paths = parents
    out = tmp_path / "fused"
    with caplog.at_level("INFO", logger="hf_otfusion"):
        assert main(["fuse", *paths, "--out", str(out)]) == 0
    notes = [r.getMessage() for r in caplog.records if "No --data" in r.getMessage()]
    assert len(notes) == 1 and "pass --data for an activation-based fusion" in notes[0]
    assert yaml.safe_load((out / "fusion_config.yaml").read_text())["cost"] == "weights"
    assert "data-free" in (out / "README.md").read_text()
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4


def test_dry_run_prints_the_plan_and_writes_nothing(parents, align_data, tmp_path, capsys):
    _, paths = parents
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--data", align_data, "--num-samples", "5", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "[anchor] " + str(tmp_path / "a") in printed and "ViTForImageClassification" in printed
    assert "heads 2 x 4" in printed and "mlp 2 x 48" in printed and "residual 1 x 32" in printed
    assert "rows 5" in printed and "nothing was written" in printed
    assert not out.exists()


def test_dry_run_names_the_splits_it_will_use(parents, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    parent, paths = parents
    rows = {"pixel_values": inputs_for(parent, batch=4)["pixel_values"].numpy(), "label": [0, 1, 0, 1]}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dd")
    data = str(tmp_path / "dd")
    assert main(["fuse", *paths, "--out", str(tmp_path / "f"), "--data", data, "--eval-data", data, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"Alignment data: {data} (disk), split train, rows all" in printed
    assert f"Evaluation data: {data} (disk), split test, rows all" in printed
    assert main(["fuse", *paths, "--out", str(tmp_path / "f"), "--data", data, "--split", "dev", "--dry-run"]) == 2
    assert "has no split 'dev'; available splits: ['train', 'test']" in capsys.readouterr().err


def test_cli_flags_cover_every_config_field():
    import dataclasses

    from hf_otfusion import FusionConfig
    from hf_otfusion.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["fuse"].format_help()
    for field in dataclasses.fields(FusionConfig):
        assert "--" + field.name.replace("_", "-") in help_text


def test_cli_config_file_is_overridden_by_flags(parents, tmp_path):
    _, paths = parents
    for name, text in (("fusion.json", json.dumps({"cost": "weights", "solver": "sinkhorn", "reg": 0.05})),
                       ("fusion.yaml", "cost: weights\nsolver: sinkhorn\nreg: 0.05\n")):  # fmt: skip
        (tmp_path / name).write_text(text)
        out = tmp_path / f"fused-{name}"
        assert (
            main(["fuse", *paths, "--out", str(out), "--config", str(tmp_path / name), "--solver", "exact", "-q"]) == 0
        )
        saved = yaml.safe_load((out / "fusion_config.yaml").read_text())
        assert saved["solver"] == "exact" and saved["reg"] == 0.05


def test_large_outputs_are_sharded_and_dtype_is_applied(parents, tmp_path):
    parent, paths = parents
    out = tmp_path / "fused"
    args = ["fuse", *paths, "--out", str(out), "--cost", "weights", "--max-shard-size", "20KB", "--dtype", "bfloat16"]
    assert main([*args, "-q"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / shard).stat().st_size < 40_000 for shard in shards)
    with safe_open(str(out / shards[0]), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    assert sorted(Provenance.load(out).outputs) == sorted(["model.safetensors.index.json", *shards])
    fused = T.AutoModelForImageClassification.from_pretrained(out, dtype=torch.float32).eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-2  # bfloat16 rounding


def test_anchor_processor_is_copied_and_the_card_parses_back(parents, tmp_path):
    _, paths = parents
    for path, license in zip(paths, ("mit", "mit"), strict=True):
        (tmp_path / path / "README.md").write_text(f"---\nlicense: {license}\n---\n# parent\n")
    (tmp_path / paths[0] / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--cost", "weights", "--solver", "sinkhorn", "-q"]) == 0
    assert (out / "preprocessor_config.json").read_bytes() == (
        tmp_path / paths[0] / "preprocessor_config.json"
    ).read_bytes()
    assert isinstance(T.AutoImageProcessor.from_pretrained(out), T.image_processing_utils.BaseImageProcessor)

    provenance = Provenance.load(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == build_card_data(provenance, ["mit", "mit"], "fused").to_dict()
    metadata = card.data.to_dict()
    assert metadata["license"] == "mit" and metadata["base_model_relation"] == "merge"
    assert metadata["pipeline_tag"] == "image-classification" and "base_model" not in metadata  # local parents
    assert build_card_data(provenance, ["mit", "apache-2.0"], "fused").license is None  # parents disagree
    assert build_card_data(provenance, ["mit", None], "fused").license is None  # one unknown
    needles = ("| `solver` | `sinkhorn` |", sha256(out.parent / "a" / "model.safetensors"), provenance.reproduce,
               "AutoModelForImageClassification", "| parent | layer | residual | heads | qk | vo | mlp |",
               "## Merge readiness", "**Recommendation: `ot`**")  # fmt: skip
    for needle in needles:
        assert needle in card.text
    readiness = provenance.readiness  # the parents are a model and its permuted copy: far apart, aligned by OT
    assert readiness["recommendation"] == "ot" and readiness["overall"][0]["relative_l2_after"] < 1e-3


def test_pickle_only_parent_is_refused_unless_allowed(parents, tmp_path, capsys):
    parent, paths = parents
    pickled = tmp_path / "pickled"
    permute_model(parent, seed=2).config.save_pretrained(pickled)
    torch.save(permute_model(parent, seed=2).state_dict(), pickled / "pytorch_model.bin")
    args = ["fuse", paths[0], str(pickled), "--out", str(tmp_path / "fused"), "--cost", "weights", "-q"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "only pickle weights (pytorch_model.bin)" in error and "--allow-pickle" in error
    assert not (tmp_path / "fused").exists()
    assert main([*args, "--allow-pickle"]) == 0
    fused = T.AutoModelForImageClassification.from_pretrained(tmp_path / "fused").eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    assert Provenance.load(tmp_path / "fused").parents[1]["weight_format"] == "pickle"


def test_serve_hub_command_serves_the_hub_api_on_loopback(tmp_path):
    import subprocess
    import sys
    import urllib.request

    command = [sys.executable, "-m", "hf_otfusion.cli", "serve-hub", "--port", "0", "--root", str(tmp_path)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        first_line = server.stdout.readline()
        url = first_line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=10) as response:
            assert json.loads(response.read())["type"] == "user"
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert server.returncode is not None


def test_cli_holds_at_most_two_models_at_any_step(parents, align_data, tmp_path, monkeypatch):
    """The pipeline hands checkpoints to `fuse`, so fusing two parents holds two models, not four."""
    import gc
    import weakref

    from datasets import Dataset

    from hf_otfusion import fusion
    from hf_otfusion.checkpoints import Checkpoint
    from hf_otfusion.methods import readiness
    from hf_otfusion.train import evaluation

    parent, paths = parents
    eval_path = tmp_path / "eval"
    labels = [k % parent.config.num_labels for k in range(10)]
    pixels = inputs_for(parent, batch=10, seed=3)["pixel_values"].numpy()
    Dataset.from_dict({"pixel_values": pixels, "labels": labels}).save_to_disk(str(eval_path))

    loaded = []  # a weak reference to every checkpoint the run loads
    load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self: loaded.append(weakref.ref(model := load(self))) or model)

    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in loaded)

    peaks = {}  # stage -> models held at each call
    stages = {
        "statistics": (fusion, "collect_statistics"), "average": (fusion, "average_into"),
        "evaluation": (evaluation, "evaluate_model"), "readiness": (readiness, "weight_distances"),
    }  # fmt: skip
    for stage, (module, function) in stages.items():
        original = getattr(module, function)

        def counted(*args, _stage=stage, _original=original, **kwargs):
            peaks.setdefault(_stage, []).append(alive())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function, counted)
    out = tmp_path / "fused"
    argv = ["fuse", *paths, "--out", str(out), "--data", align_data, "--eval-data", str(eval_path), "-q"]
    assert main([*argv, "--eval-split", "train"]) == 0
    # fusing, and building the vanilla row the same way: the anchor (overwritten into the result) and the other
    # parent; the fused model is written and freed before the evaluation and the readiness report
    assert peaks["statistics"] == [2] and peaks["average"] == [2, 2]
    # scoring a row holds that row's model alone; the report holds the anchor and one parent
    assert peaks["evaluation"] == [1, 1, 1, 1] and peaks["readiness"] == [2]
    # fuse 2; evaluation 2 parents, 2 for the vanilla average, the fused model; report 2; the result loaded back
    assert len(loaded) == 10
    assert alive() == 0  # nothing is held once the command returns
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    rows = {row["name"]: row for row in Provenance.load(out).evaluation["rows"]}
    assert rows["fused"]["accuracy"] == rows[next(name for name in rows if name.startswith("parent 0"))]["accuracy"]


def test_a_missing_split_is_named_without_blaming_the_tokenizer(parents, align_data, tmp_path, capsys):
    _, paths = parents  # saved without a processor: data must already hold model inputs
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--data", align_data, "--split", "validation", "-q"]) != 0
    error = capsys.readouterr().err
    assert "has no split 'validation'" in error and "tokenizer" not in error
    assert not out.exists()


def test_best_quality_flag_records_its_fields_and_asks_for_data(parents, align_data, tmp_path, capsys):
    _, paths = parents
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--quality", "best", "-q"]) == 2
    assert "quality=best) needs alignment data: pass --data" in capsys.readouterr().err and not out.exists()
    flags = ["--data", align_data, "--batch-size", "2", "--quality", "best", "--refine-steps", "4", "-q"]
    assert main(["fuse", *paths, "--out", str(out), *flags]) == 0
    config = yaml.safe_load((out / "fusion_config.yaml").read_text())
    assert (config["quality"], config["refine_steps"], config["refine_weights"]) == ("best", 4, True)
    assert config["cost"] == "weights"  # the preset's closed-form start, refined on the data
    card = (out / "README.md").read_text()
    choice = json.loads((out / "fusion_provenance.json").read_text())["quality"]["choice"]
    assert set(choice["held_back_loss"]) == {"refined", "closed-form", "anchor"}
    other = "closed-form" if choice["kept"] == "refined" else "refined"
    assert f'`quality="best"` kept the {choice["kept"]} fusion over the {other} one' in card
    assert ("Learned parent weights per layer group" in card) == (choice["kept"] == "refined")
