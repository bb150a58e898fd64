"""No `--out` destroys files: unsafe paths are refused before any work, and `--overwrite` swaps, never deletes first."""

from __future__ import annotations

import os

import pytest
from conftest import build
from test_finetune import bars, fresh_vit

from hf_otfusion import permute_model
from hf_otfusion.cli import main
from hf_otfusion.errors import OutputExistsError, UnsafeOutputError
from hf_otfusion.output.staging import check_output_dir, recover_interrupted, stage_output
from hf_otfusion.train.finetune import FinetuneConfig, finetune


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding two parents and sentinel files, with HOME elsewhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    parent = build("vit-cls")
    parent.save_pretrained(work / "a")
    permute_model(parent, seed=1).save_pretrained(work / "b")
    (work / "notes.txt").write_text("sentinel")
    (work / "data").mkdir()
    (work / "data" / "rows.csv").write_text("x,y\n1,2\n")
    monkeypatch.chdir(work)
    return work


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FUSE = ["fuse", "./a", "./b", "--cost", "weights", "-q"]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "--out . is the working directory"),
        ("..", "--out .. is an ancestor of the working directory"),
        ("/", "--out / is an ancestor of the working directory"),
        ("./a", "--out a is the input ./a"),
        ("a/fused", "--out a/fused lies inside the input ./a"),
        ("~", "--out ~ is the home directory"),
    ],
)
def test_fuse_refuses_an_out_that_would_replace_the_working_directory_or_a_parent(workdir, capsys, out, message):
    before = snapshot(workdir)
    assert main([*FUSE, "--out", out, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and "Traceback" not in error
    assert snapshot(workdir) == before  # sentinels and parents untouched
    assert not list(workdir.parent.rglob("*.otfusion-staging-*"))


def test_fuse_refuses_an_out_that_contains_a_parent(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory is no longer below --out
    before = snapshot(workdir)
    assert main(["fuse", str(workdir / "a"), str(workdir / "b"), "--cost", "weights", "-q", "--out", str(workdir),
                 "--overwrite"]) == 2  # fmt: skip
    assert f"contains the input {workdir / 'a'}" in capsys.readouterr().err
    assert snapshot(workdir) == before


def test_fuse_refuses_an_out_that_is_a_file_or_a_symlink(workdir, capsys):
    assert main([*FUSE, "--out", "notes.txt", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("error: --out notes.txt is a file, not a directory")
    os.symlink(workdir / "data", workdir / "link")
    assert main([*FUSE, "--out", "link", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out link is a symbolic link (to {workdir / 'data'})")
    assert (workdir / "notes.txt").read_text() == "sentinel" and (workdir / "data" / "rows.csv").is_file()


def test_fuse_refuses_an_out_in_a_read_only_directory_before_any_work(workdir, capsys, monkeypatch):
    (workdir / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        "hf_otfusion.output.staging.os.access", lambda p, mode: real_access(p, mode) and p.name != "locked"
    )
    monkeypatch.setattr("hf_otfusion.job.preflight.preflight", lambda *a, **k: pytest.fail("pre-flight ran"))
    assert main([*FUSE, "--out", "locked/new/fused"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out locked/new/fused: {workdir / 'locked'} is not writable")
    assert list((workdir / "locked").iterdir()) == []


def test_overwrite_keeps_the_old_output_when_the_new_one_cannot_be_written(workdir, capsys, monkeypatch):
    old = workdir / "fused"
    old.mkdir()
    (old / "old.txt").write_text("old output")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full_disk)
    assert main([*FUSE, "--out", "fused", "--overwrite"]) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    assert snapshot(old) == {"old.txt": b"old output"}
    assert not list(workdir.glob(".fused.*"))


def test_an_interrupted_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old output")
    renames = []

    def rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # the new output cannot be moved in
            raise OSError(5, "Input/output error")
        os.replace(src, dst)

    monkeypatch.setattr("hf_otfusion.output.staging.os.rename", rename)
    with pytest.raises(OSError, match="Input/output"), stage_output(target, overwrite=True) as stage:
        (stage.path / "new.txt").write_text("new output")
        stage.publish()
    assert snapshot(target) == {"old.txt": b"old output"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_swaps_the_new_output_in_and_deletes_the_old_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old output")
    with stage_output(check_output_dir(target, overwrite=True), overwrite=True) as stage:
        (stage.path / "new.txt").write_text("new output")
        stage.publish()
    assert snapshot(target) == {"new.txt": b"new output"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_killed_runs_are_removed_and_a_moved_aside_output_restored(tmp_path, caplog):
    target = tmp_path / "out"
    (tmp_path / ".out.otfusion-staging-123-abcd").mkdir()  # a run killed while writing
    aside = tmp_path / ".out.otfusion-old-123-abcd"  # a run killed between the two renames of a swap
    aside.mkdir()
    (aside / "old.txt").write_text("old output")
    (tmp_path / ".other.otfusion-staging-1").mkdir()  # another output's: not ours to touch
    with caplog.at_level("WARNING", logger="hf_otfusion"):
        with pytest.raises(OutputExistsError, match="exists and is not empty"):
            check_output_dir(target)
    assert snapshot(target) == {"old.txt": b"old output"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.otfusion-staging-1", "out"]
    assert "restored the previous output" in caplog.text and "left by an interrupted run" in caplog.text


def test_a_live_runs_staging_directory_is_left_alone(tmp_path):
    target = tmp_path / "out"
    with stage_output(target, overwrite=False) as live:
        assert recover_interrupted(target) == [] and live.path.is_dir()
        with (
            pytest.raises(OutputExistsError, match="Another run is writing"),
            stage_output(target, overwrite=False, name=live.path.name.rsplit("staging-", 1)[1]),
        ):
            pass
        assert live.path.is_dir()
    assert not live.path.exists()


def test_fuse_cleans_a_stale_staging_directory_and_writes_the_output(workdir, caplog):
    stale = workdir / ".fused.otfusion-staging-99999-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    with caplog.at_level("WARNING", logger="hf_otfusion"):
        assert main([*FUSE, "--out", "fused"]) == 0
    assert not stale.exists() and f"removed {stale}" in caplog.text
    assert (workdir / "fused" / "model.safetensors").is_file()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("out", "message"),
    [(".", "--out . is the working directory"), ("./model", "--out model is the input ./model"),
     ("notes.txt", "--out notes.txt is a file"), ("model/ft", "--out model/ft lies inside the input ./model")],
)  # fmt: skip
def test_finetune_cli_refuses_unsafe_outputs_before_loading(workdir, capsys, out, message):
    fresh_vit().save_pretrained(workdir / "model")
    before = snapshot(workdir)
    assert main(["finetune", "./model", "--data", "./data", "--out", out, "--overwrite", "-q"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert snapshot(workdir) == before


def test_finetune_refuses_its_source_directory_and_swaps_an_old_output(workdir):
    fresh_vit().save_pretrained(workdir / "model")
    config = FinetuneConfig(max_steps=1)
    with pytest.raises(UnsafeOutputError, match="output_dir model is the input"):
        finetune("model", bars(16, 0), config=config, output_dir="model", overwrite=True, progress=False)
    old = workdir / "ft"
    old.mkdir()
    (old / "old.txt").write_text("old output")
    (workdir / ".ft.otfusion-staging-finetune").mkdir()  # left by a killed finetune
    finetune("model", bars(16, 0), config=config, output_dir="ft", overwrite=True, progress=False)
    assert "model.safetensors" in {p.name for p in old.iterdir()} and not (old / "old.txt").exists()
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".")] == []


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from hf_otfusion.output import staging as output_dir

target, when = Path(sys.argv[1]), sys.argv[2]
real_rename = os.rename

def rename(src, dst):
    real_rename(src, dst)
    if when == "mid-swap" and Path(dst).name.startswith(".out.otfusion-old-"):
        os.kill(os.getpid(), signal.SIGKILL)  # the old output is aside, the new one not yet in

output_dir.os.rename = rename
with output_dir.stage_output(output_dir.check_output_dir(target, overwrite=True), overwrite=True) as stage:
    (stage.path / "new.txt").write_text("new output")
    if when == "while-writing":
        os.kill(os.getpid(), signal.SIGKILL)
    stage.publish()
"""


@pytest.mark.parametrize("when", ["while-writing", "mid-swap"])
def test_a_run_killed_while_writing_or_swapping_loses_nothing_and_the_next_run_cleans_up(tmp_path, when):
    import subprocess
    import sys

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old output")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(target), when], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    leftovers = sorted(p.name.split("-")[1] for p in tmp_path.iterdir() if p.name != "out")
    assert leftovers == (["old", "staging"] if when == "mid-swap" else ["staging"])
    assert (target / "old.txt").is_file() != (when == "mid-swap")  # mid-swap: --out is missing for now
    check_output_dir(target, overwrite=True)  # the next run
    assert snapshot(target) == {"old.txt": b"old output"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
