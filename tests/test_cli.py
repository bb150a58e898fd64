"""`otfusion-hub fuse` on local checkpoints: flags equal FusionConfig fields, outputs are atomic and safe."""

from __future__ import annotations

import json

import pytest
import transformers as T
from conftest import build, inputs_for, outputs, relative_error

from hf_otfusion import permute_model
from hf_otfusion.cli import main


@pytest.fixture
def parents(tmp_path):
    parent = build("vit-cls")
    paths = [tmp_path / "a", tmp_path / "b"]
    parent.save_pretrained(paths[0])
    permute_model(parent, seed=1).save_pretrained(paths[1])
    return parent, [str(p) for p in paths]


def test_cli_fuses_saved_parents_into_a_loadable_checkpoint(parents, tmp_path, capsys):
    parent, paths = parents
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--cost", "weights", "--solver", "exact", "-q"]) == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "fusion_config.json").read_text())["cost"] == "weights"
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4
    assert "Fused model written to" in capsys.readouterr().out


def test_cli_activation_fusion_reads_a_saved_dataset(parents, tmp_path):
    from datasets import Dataset

    parent, paths = parents
    data = tmp_path / "align"
    Dataset.from_dict({"pixel_values": inputs_for(parent)["pixel_values"].numpy()}).save_to_disk(str(data))
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--data", str(data), "--batch-size", "4", "-q"]) == 0
    fused = T.AutoModelForImageClassification.from_pretrained(out).eval()
    inputs = inputs_for(parent, seed=3)
    assert relative_error(outputs(fused, inputs), outputs(parent, inputs)) < 1e-4


def test_cli_refuses_a_non_empty_out_and_keeps_it(parents, tmp_path):
    _, paths = parents
    out = tmp_path / "fused"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not empty.*--overwrite"):
        main(["fuse", *paths, "--out", str(out), "--cost", "weights", "-q"])
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


def test_cli_flags_cover_every_config_field():
    import dataclasses

    from hf_otfusion import FusionConfig
    from hf_otfusion.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["fuse"].format_help()
    for field in dataclasses.fields(FusionConfig):
        assert "--" + field.name.replace("_", "-") in help_text


def test_cli_config_file_is_overridden_by_flags(parents, tmp_path):
    _, paths = parents
    config = tmp_path / "fusion.json"
    config.write_text(json.dumps({"cost": "weights", "solver": "sinkhorn", "reg": 0.05}))
    out = tmp_path / "fused"
    assert main(["fuse", *paths, "--out", str(out), "--config", str(config), "--solver", "exact", "-q"]) == 0
    saved = json.loads((out / "fusion_config.json").read_text())
    assert saved["solver"] == "exact" and saved["reg"] == 0.05


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
