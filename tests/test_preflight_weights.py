"""Pre-flight reads the safetensors headers and catches what loading would: a file cut short or with bytes appended
(its length must be exactly 8 + header + data), before any weight is downloaded."""

from __future__ import annotations

import pytest
from conftest import build

from hf_otfusion import permute_model
from hf_otfusion.cli import main


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
