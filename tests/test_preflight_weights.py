"""Pre-flight reads the safetensors headers and catches what loading would: a file cut short or with bytes appended
(its length must be exactly 8 + header + data), and tensors missing or misshapen against the config's model, all
before any weight is downloaded; well-formed parents (tied MLM decoder, sharded saves) pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build
from safetensors.torch import load_file, save_file

from hf_otfusion import permute_model
from hf_otfusion.cli import main
from hf_otfusion.errors import CorruptCheckpointError
from hf_otfusion.hub.parents import resolve_parent
from hf_otfusion.job.preflight import check_tensors, meta_model


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture
def parents(tmp_path, monkeypatch):
    """Parents `a` and `b` (a permuted copy) of a tiny ViT classifier, in the working directory."""
    parent = build("vit-cls")
    parent.save_pretrained(tmp_path / "a")
    permute_model(parent, seed=1).save_pretrained(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dry_run_error(work, capsys) -> str:
    """Runs `fuse a b --dry-run`, expects exit 2 with one `error:` line and nothing written; returns that line."""
    before = sorted(p.name for p in work.iterdir())
    assert run(["fuse", "a", "b", "--out", "fused", "--cost", "weights", "--dry-run", "-q"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert sorted(p.name for p in work.iterdir()) == before  # no output, no staging directory
    return next(line for line in error.splitlines() if line.startswith("error: "))


@pytest.mark.parametrize(("edit", "how"), [
    (lambda data: data[:-300], "the file is truncated"),
    (lambda data: data + b"\x00" * 5, "the file is 5 bytes longer than its header describes"),
], ids=["truncated-300", "appended-5"])  # fmt: skip
def test_a_weight_file_of_the_wrong_length_fails_the_dry_run(parents, capsys, edit, how):
    path = parents / "b" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(edit(data))
    line = dry_run_error(parents, capsys)
    actual = len(edit(data))
    assert f"model.safetensors is {actual:,} bytes but its header describes {len(data):,} bytes" in line
    assert how in line and "Re-download it, or re-export it with save_pretrained" in line
    assert line.startswith("error: Parent 'b': model.safetensors is")


def test_a_missing_tensor_fails_the_dry_run_naming_it(parents, capsys):
    path = parents / "b" / "model.safetensors"
    weights = load_file(path)
    del weights["classifier.bias"]
    save_file(weights, path, metadata={"format": "pt"})
    line = dry_run_error(parents, capsys)
    assert "does not hold the weights its config describes (ViTForImageClassification)" in line
    assert "missing: 1 (classifier.bias)" in line


def test_a_misshapen_tensor_fails_the_dry_run_naming_it_and_both_shapes(parents, capsys):
    path = parents / "b" / "model.safetensors"
    weights = load_file(path)
    weights["classifier.weight"] = torch.zeros(4, 32)
    save_file(weights, path, metadata={"format": "pt"})
    line = dry_run_error(parents, capsys)
    assert "wrong shape: 1 (classifier.weight [4, 32] (expected [3, 32]))" in line


def test_many_missing_tensors_are_counted_and_the_first_few_named(tmp_path):
    build("bert-seqcls").save_pretrained(tmp_path / "p")
    weights = load_file(tmp_path / "p" / "model.safetensors")
    weights = {k: v for k, v in weights.items() if ".layer.1." not in k}
    save_file(weights, tmp_path / "p" / "model.safetensors", metadata={"format": "pt"})
    parent = resolve_parent(str(tmp_path / "p"))
    with pytest.raises(CorruptCheckpointError, match=r"missing: 16 \(bert\.encoder\.layer\.1\..*, \.\.\. 11 more\)"):
        check_tensors(parent, meta_model(parent, False))


@pytest.mark.parametrize("family", ["bert-mlm", "roberta-mlm", "bert-seqcls", "vit-cls", "deit-teacher"])
@pytest.mark.parametrize("shard", [None, "50KB"])
def test_well_formed_parents_pass_tied_decoders_and_shards_included(tmp_path, family, shard):
    model = build(family)
    model.save_pretrained(tmp_path / "p", **({"max_shard_size": shard} if shard else {}))
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert ("model.safetensors.index.json" in names) == (shard is not None)
    parent = resolve_parent(str(tmp_path / "p"))
    if family.endswith("mlm"):  # the tied decoder copy is not saved, yet nothing is missing
        assert not any(name.endswith("decoder.weight") for name in parent.tensors)
    check_tensors(parent, meta_model(parent, False))


def test_a_tied_mlm_pair_fuses_through_the_dry_run(tmp_path, monkeypatch, capsys):
    parent = build("bert-mlm")
    parent.save_pretrained(tmp_path / "a", max_shard_size="50KB")
    permute_model(parent, seed=1).save_pretrained(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    assert run(["fuse", "a", "b", "--out", "fused", "--cost", "weights", "--dry-run"]) == 0
    assert "nothing was written" in capsys.readouterr().out
    assert not (tmp_path / "fused").exists()


def test_the_real_minilm_checkpoint_passes_its_saved_position_ids_ignored(caplog):
    from test_real_checkpoint import minilm_dir

    parent = resolve_parent(str(minilm_dir()))
    assert "embeddings.position_ids" in parent.tensors  # a non-persistent buffer, saved by an older transformers
    check_tensors(parent, meta_model(parent, False))
    assert "has no place for" not in caplog.text


def test_unexpected_tensors_alone_are_a_warning_as_transformers_ignores_them(tmp_path, caplog):
    build("vit-cls").save_pretrained(tmp_path / "p")
    weights = load_file(tmp_path / "p" / "model.safetensors")
    weights["extra.head.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "p" / "model.safetensors", metadata={"format": "pt"})
    parent = resolve_parent(str(tmp_path / "p"))
    check_tensors(parent, meta_model(parent, False))
    assert "holds 1 tensor(s) ViTForImageClassification has no place for, ignored: extra.head.weight" in caplog.text


def test_bare_encoders_saved_without_their_pooler_fuse_through_the_cli(tmp_path, monkeypatch, capsys):
    from conftest import FAMILIES, inputs_for, randomise, relative_error

    from hf_otfusion.checkpoints import Checkpoint

    model_class, make_config = FAMILIES["bert-base"]
    parent = randomise(model_class(make_config(), add_pooling_layer=False), seed=0)
    parent.save_pretrained(tmp_path / "a")
    permute_model(parent, seed=1).save_pretrained(tmp_path / "b")
    assert not any("pooler" in name for name in load_file(tmp_path / "a" / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert run(["fuse", "a", "b", "--out", "fused", "--cost", "weights", "--dry-run"]) == 0  # no missing pooler
    assert run(["fuse", "a", "b", "--out", "fused", "--cost", "weights", "--solver", "exact", "-q"]) == 0, (
        capsys.readouterr().err
    )
    assert Checkpoint("a").skeleton().pooler is None
    fused = Checkpoint("fused").load()  # built without a pooler too: nothing missing
    assert fused.pooler is None
    batch = inputs_for(parent)
    with torch.no_grad():
        expected, got = parent(**batch).last_hidden_state, fused(**batch).last_hidden_state
    assert relative_error(got, expected) < 1e-4  # the permuted copy is recovered


@pytest.mark.parametrize("family", ["bert-base", "roberta-base", "vit-base", "deit-base"])
def test_every_bare_encoder_saved_without_its_pooler_passes_pre_flight_and_loads(tmp_path, family):
    from conftest import FAMILIES

    from hf_otfusion.checkpoints import Checkpoint

    model_class, make_config = FAMILIES[family]
    model_class(make_config(), add_pooling_layer=False).save_pretrained(tmp_path / "p")
    parent = resolve_parent(str(tmp_path / "p"))
    model = meta_model(parent, False)
    assert model.pooler is None
    check_tensors(parent, model)
    assert Checkpoint(str(tmp_path / "p")).load().pooler is None
    model_class(make_config()).save_pretrained(tmp_path / "with")  # with a pooler saved, it is built and loaded
    assert Checkpoint(str(tmp_path / "with")).load().pooler is not None
