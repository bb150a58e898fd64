"""Every bad input through the CLI ends in one `error: ...` line and a documented exit code, with no traceback and
nothing written: no output directory, no staging directory."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from conftest import build
from hub_utils import client_env, run_cli

from hf_otfusion import permute_model
from hf_otfusion.cli import main
from hf_otfusion.errors import NonFiniteWeightsError
from hf_otfusion.output.staging import check_fused_finite


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Parents `a`, `b` (a permuted copy), `deep` (one layer more), `huge-a`/`huge-b` (weights beyond float16),
    config files, a file, a symlink, a non-empty directory and a directory without config.json."""
    work = tmp_path_factory.mktemp("work")
    parent = build("vit-cls")
    parent.save_pretrained(work / "a")
    permute_model(parent, seed=1).save_pretrained(work / "b")
    build("vit-cls", num_hidden_layers=3).save_pretrained(work / "deep")
    with torch.no_grad():
        parent.classifier.bias.fill_(1e6)
    parent.save_pretrained(work / "huge-a")
    permute_model(parent, seed=2).save_pretrained(work / "huge-b")
    configs = {"reg-abc": 'reg: "abc"\n', "batch-negative": "batch_size: -4\n", "unknown": "regularisation: 1\n",
               "list": "- 1\n- 2\n", "weights-text": "weights: [nan, 1]\n"}  # fmt: skip
    for name, text in configs.items():
        (work / f"{name}.yaml").write_text(text)
    (work / "notes.txt").write_text("sentinel")
    (work / "kept").mkdir()
    (work / "kept" / "old.txt").write_text("old output")
    (work / "link").symlink_to(work / "kept")
    (work / "empty-dir").mkdir()
    return work


FUSE = ["fuse", "a", "b", "--cost", "weights", "-q"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")

# (argv, exit code, start of the `error:` line)
CASES = [
    ([*FUSE, "--out", "fused", "--weights", "nan", "1"], 2, "FusionConfig.weights[0] must be finite, got nan."),
    ([*FUSE, "--out", "fused", "--weights", "inf", "1"], 2, "FusionConfig.weights[0] must be finite, got inf."),
    ([*FUSE, "--out", "fused", "--weights", "1", "-1"], 2, "FusionConfig.weights must be non-negative"),
    ([*FUSE, "--out", "fused", "--weights", "1", "1", "1"], 2, "FusionConfig.weights has 3 entries for 2 parents"),
    ([*FUSE, "--out", "fused", "--sinkhorn-max-iter", "-5"], 2, "FusionConfig.sinkhorn_max_iter must be >= 1, got -5."),
    ([*FUSE, "--out", "fused", "--emd-max-iter", "0"], 2, "FusionConfig.emd_max_iter must be >= 1, got 0."),
    ([*FUSE, "--out", "fused", "--reg", "0"], 2, "FusionConfig.reg must be > 0, got 0.0."),
    ([*FUSE, "--out", "fused", "--reg", "nan"], 2, "FusionConfig.reg must be finite, got nan."),
    ([*FUSE, "--out", "fused", "--reg", "abc"], 2, "argument --reg: invalid float value: 'abc'"),
    ([*FUSE, "--out", "fused", "--regmean-alpha", "1.5"], 2, "FusionConfig.regmean_alpha must lie in [0, 1], got 1.5"),
    ([*FUSE, "--out", "fused", "--scale", "inf"], 2, "FusionConfig.scale must be finite, got inf."),
    ([*FUSE, "--out", "fused", "--batch-size", "-1"], 2, "FusionConfig.batch_size must be >= 1, got -1."),
    ([*FUSE, "--out", "fused", "--num-samples", "0"], 2, "FusionConfig.num_samples must be >= 1, got 0."),
    ([*FUSE, "--out", "fused", "--tokens-per-sample", "-3"], 2, "FusionConfig.tokens_per_sample must be >= 1"),
    ([*FUSE, "--out", "fused", "--anchor", "-1"], 2, "FusionConfig.anchor must be >= 0, got -1."),
    ([*FUSE, "--out", "fused", "--anchor", "5"], 2, "FusionConfig.anchor=5 is out of range for 2 parents."),
    ([*FUSE, "--out", "fused", "--config", "reg-abc.yaml"], 2, "FusionConfig.reg must be a number, got 'abc' (str)."),
    ([*FUSE, "--out", "fused", "--config", "batch-negative.yaml"], 2, "FusionConfig.batch_size must be >= 1, got -4"),
    ([*FUSE, "--out", "fused", "--config", "unknown.yaml"], 2, "Unknown FuseJob key(s) ['regularisation']"),
    ([*FUSE, "--out", "fused", "--config", "list.yaml"], 2, "list.yaml must hold a mapping of FusionConfig fields"),
    ([*FUSE, "--out", "fused", "--config", "weights-text.yaml"], 2, "FusionConfig.weights[0] must be a number, got"),
    ([*FUSE, "--out", "fused", "--config", "missing.yaml"], 2, "Cannot read the fusion config missing.yaml"),
    ([*FUSE, "--out", "fused", "--max-shard-size", "banana"], 2, "max_shard_size (--max-shard-size) 'banana' is not"),
    ([*FUSE, "--out", "fused", "--device", "tpu9"], 2, "device='tpu9' is not a torch device"),
    pytest.param([*FUSE, "--out", "fused", "--device", "cuda"], 2, "device='cuda' was asked for", marks=NO_GPU),
    ([*FUSE, "--out", "fused", "--max-length", "0"], 2, "argument --max-length: must be >= 1, got 0"),
    ([*FUSE, "--out", "fused", "--data-seed", "-1"], 2, "argument --data-seed: must lie in [0, 4294967295], got -1"),
    ([*FUSE, "--out", "fused", "--eval-num-samples", "x"], 2, "argument --eval-num-samples: must be an integer"),
    ([*FUSE, "--out", "fused", "--target", "hidden_size=abc"], 2, "FusionConfig.target['hidden_size']='abc' is not"),
    ([*FUSE, "--out", "fused", "--target", "hidden_size=16", "--method", "vanilla"], 2, "target={'hidden_size': 16}"),
    ([*FUSE, "--out", "fused", "--solver", "hungarian"], 2, "argument --solver: invalid choice: 'hungarian'"),
    ([*FUSE, "--out", "fused", "--dtype", "float64"], 2, "argument --dtype: invalid choice: 'float64'"),
    ([*FUSE, "--out", "fused", "--base", "a"], 2, "base='a' is only used by method='task-arithmetic'"),
    (["fuse", "a", "b", "--out", "fused", "--cost", "activations", "-q"], 2,
     "This fusion (cost=activations) needs alignment data: pass --data"),
    (["fuse", "a", "b", "--out", "fused", "--repair", "all", "-q"], 2,
     "This fusion (cost=activations, repair=all) needs alignment data"),
    (["fuse", "a", "b", "--out", "fused", "--residual", "orthogonal", "-q"], 2,
     "This fusion (cost=activations, residual=orthogonal) needs alignment data"),
    (["fuse", "a", "b", "--out", "fused", "--within-heads", "orthogonal", "-q"], 2,
     "This fusion (cost=activations, within_heads=orthogonal) needs alignment data"),
    (["fuse", "a", "b", "--out", "fused", "--refine-steps", "3", "-q"], 2,
     "This fusion (cost=activations, refine_steps=3) needs alignment data"),
    (["fuse", "a", "b", "--out", "fused", "--method", "regmean", "-q"], 2,
     "This fusion (method=regmean) needs alignment data"),
    (["fuse", "a", "--out", "fused", "--cost", "weights", "-q"], 2, "Fusion needs at least 2 parents, got 1."),
    (["fuse", "a", "./nope", "--out", "fused", "--cost", "weights"], 2, "Parent './nope' is not a checkpoint"),
    (["fuse", "a", "deep", "--out", "fused", "--cost", "weights", "-q"], 2, "Parent 1 has 3 layers but the anchor"),
    (["fuse", "huge-a", "huge-b", "--out", "fused", "--cost", "weights", "--dtype", "float16", "-q"], 2,
     "The fused model has NaN or infinite values in classifier.bias after the cast to float16; nothing was written"),
    ([*FUSE, "--out", "notes.txt", "--overwrite"], 2, "--out notes.txt is a file, not a directory"),
    ([*FUSE, "--out", ".", "--overwrite"], 2, "--out . is the working directory"),
    ([*FUSE, "--out", "a", "--overwrite"], 2, "--out a is the input a"),
    ([*FUSE, "--out", "link", "--overwrite"], 2, "--out link is a symbolic link"),
    ([*FUSE, "--out", "kept"], 2, "--out kept exists and is not empty; choose another path or pass --overwrite"),
    (["finetune", "a", "--data", "nope", "--out", "fused", "--max-steps", "0"], 2, "FinetuneConfig.max_steps must"),
    (["finetune", "a", "--data", "nope", "--out", "fused", "--learning-rate", "nan"], 2,
     "FinetuneConfig.learning_rate must be finite, got nan."),
    (["finetune", "a", "--data", "nope", "--out", "fused", "--batch-size", "-2"], 2, "FinetuneConfig.batch_size must"),
    (["finetune", "a", "--data", "nope", "--out", "fused", "--seed", "-1"], 2, "FinetuneConfig.seed must lie in [0,"),
    (["finetune", "a", "--data", "nope", "--out", "fused", "--num-samples", "0"], 2, "argument --num-samples: must"),
    (["finetune", "a", "--data", "nope", "--out", ".", "--overwrite"], 2, "--out . is the working directory"),
    (["finetune", "a", "--data", "nope", "--out", "a/ft"], 2, "--out a/ft lies inside the input a"),
    (["eval", "a", "--data", "nope", "--batch-size", "0"], 2, "argument --batch-size: must be >= 1, got 0"),
    (["inspect", "a", "b", "--num-samples", "-1"], 2, "argument --num-samples: must be >= 1, got -1"),
    (["inspect", "a", "./nope", "-q"], 2, "Parent './nope' is not a checkpoint directory and not a Hub model id"),
    (["inspect", "a", "b", "--data", "nope", "-q"], 2, "Data source 'nope' is a Hub id but Hub access is disabled"),
    (["serve-hub", "--root", "hub", "--port", "70000"], 2, "argument --port: must lie in [0, 65535], got 70000"),
    (["push", "empty-dir", "ns/model"], 3, "empty-dir holds no config.json"),
    ([], 2, "the following arguments are required: command"),
]  # fmt: skip


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's usage errors
        return exit.code


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_input_exits_with_one_error_line_and_writes_nothing(workdir, monkeypatch, capsys, argv, code, message):
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in workdir.iterdir())
    assert run(argv) == code
    error = capsys.readouterr().err
    first = next(line for line in error.splitlines() if line.startswith("error: "))
    assert first.startswith(f"error: {message}"), error
    assert "Traceback" not in error
    assert sorted(p.name for p in workdir.iterdir()) == before  # no output, no staging directory
    assert (workdir / "kept" / "old.txt").read_text() == "old output"


def test_at_least_thirty_bad_inputs_are_covered():
    assert len(CASES) >= 30


def test_the_fused_tensors_are_checked_before_writing():
    model = build("vit-cls")
    check_fused_finite(model)
    with torch.no_grad():
        model.vit.layers[0].mlp.fc2.bias[1] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"vit\.layers\.0\.mlp\.fc2\.bias; nothing was written") as caught:
        check_fused_finite(model)
    assert caught.value.tensor == "vit.layers.0.mlp.fc2.bias"


def test_an_internal_error_says_it_is_a_bug_and_debug_shows_the_traceback(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr("hf_otfusion.fusion.fuse_with_diagnostics", broken)
    assert run([*FUSE, "--out", "fused"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: internal error: KeyError: 'boom'. This is a bug in hf_otfusion; please report")
    assert "--debug" in error and "Traceback" not in error
    with pytest.raises(KeyError, match="boom"):
        main(["--debug", *FUSE, "--out", "fused"])
    with pytest.raises(KeyError, match="boom"):
        main([*FUSE, "--out", "fused", "--debug"])
    assert not (workdir / "fused").exists()


def test_serve_hub_on_a_busy_port_says_so(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run(["serve-hub", "--root", str(tmp_path / "hub"), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot serve on 127.0.0.1:{port}: Address already in use; choose another --port")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hanging_up_server() -> tuple[socket.socket, int]:
    """A server that accepts every connection and closes it before answering (a Hub killed mid-request)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.recv(65536)
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_push_to_a_server_that_is_down_or_hangs_up_exits_3_with_the_retry_command(workdir, tmp_path):
    server, hang_up = hanging_up_server()
    try:
        for port, reason in ((closed_port(), "Connection refused"), (hang_up, "")):
            env = client_env(f"http://127.0.0.1:{port}", tmp_path / "home")
            result = run_cli(["push", str(workdir / "a"), "ns/fused", "--private"], env, cwd=tmp_path)
            assert result.returncode == 3, result.stderr
            assert result.stderr.startswith("error: Upload of ") and reason in result.stderr
            assert f"retry the upload with:\n  otfusion-hub push {workdir / 'a'} ns/fused --private" in result.stderr
            assert "Traceback" not in result.stderr
    finally:
        server.close()


def test_fuse_push_to_a_server_that_is_down_keeps_the_output_and_prints_the_retry(workdir, tmp_path):
    env = client_env(f"http://127.0.0.1:{closed_port()}", tmp_path / "home")
    out = tmp_path / "fused"
    args = ["fuse", str(workdir / "a"), str(workdir / "b"), "--out", str(out), "--cost", "weights", "-q"]
    result = run_cli([*args, "--push-to-hub", "ns/fused"], env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "Connection refused" in result.stderr and f"otfusion-hub push {out} ns/fused" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "model.safetensors").is_file()


def test_the_errors_behind_a_missing_parent_and_a_bad_push_carry_their_values(workdir, monkeypatch):
    """The in-process errors behind `inspect a ./nope` (exit 2) and `push empty-dir ...` / a refused upload (exit 3)."""
    from hf_otfusion.errors import ParentNotFoundError, PushError
    from hf_otfusion.hub.parents import resolve_parent
    from hf_otfusion.hub.push import push_folder

    monkeypatch.chdir(workdir)
    with pytest.raises(ParentNotFoundError, match="Parent './nope' is not a checkpoint directory") as caught:
        resolve_parent("./nope")
    assert isinstance(caught.value, FileNotFoundError) and caught.value.source == "./nope"

    with pytest.raises(PushError, match="empty-dir holds no config.json") as caught:
        push_folder("empty-dir", "ns/model")
    assert (caught.value.repo_id, str(caught.value.folder)) == ("ns/model", "empty-dir")
    assert caught.value.retry == "otfusion-hub push empty-dir ns/model"

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", refused)
    with pytest.raises(PushError, match="Upload of a to ns/fused failed: .*Connection refused") as caught:
        push_folder("a", "ns/fused", private=True)
    assert isinstance(caught.value, OSError) and isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert (caught.value.repo_id, str(caught.value.folder)) == ("ns/fused", "a")
    assert caught.value.retry == "otfusion-hub push a ns/fused --private"
