"""Every bad input through the CLI ends in one `error: ...` line and a documented exit code, with no traceback and
nothing written: no output directory, no staging directory."""

from __future__ import annotations

import shutil
import socket
import threading

import numpy as np
import pytest
import torch
from conftest import build, inputs_for
from datasets import Dataset, DatasetDict
from hub_utils import client_env, run_cli
from PIL import Image
from transformers import BertTokenizer, ViTImageProcessor

from hf_otfusion import permute_model
from hf_otfusion.cli import main
from hf_otfusion.errors import NonFiniteWeightsError
from hf_otfusion.output.staging import check_fused_finite


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Parents `a`, `b` (a permuted copy), `deep` (one layer more), `wide` (hidden size 48), `huge-a`/`huge-b`
    (weights beyond float16), `a12` (`a` with an image processor that resizes to 12x12), BERT `ta`/`tb` (with a
    tokenizer) and RoBERTa `ra`/`rb`, data sets that do not fit them or have no rows, config files, a file, a
    symlink, a non-empty directory, a directory without config.json and `tâche`, a copy of `b` whose name is
    no valid Hub repository name."""
    work = tmp_path_factory.mktemp("work")
    parent = build("vit-cls")
    parent.save_pretrained(work / "a")
    permute_model(parent, seed=1).save_pretrained(work / "b")
    shutil.copytree(work / "b", work / "tâche")  # a folder name that is no Hub repository name
    build("vit-cls", num_hidden_layers=3).save_pretrained(work / "deep")
    build("vit-cls", hidden_size=48).save_pretrained(work / "wide")
    shutil.copytree(work / "a", work / "a12")
    ViTImageProcessor(size={"height": 12, "width": 12}, image_mean=[0.5], image_std=[0.5]).save_pretrained(work / "a12")
    save_data_sets(work, parent)
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


def save_data_sets(work, parent) -> None:
    """Image, text and token-id data sets that the tiny parents cannot read, and data sets without rows."""
    pixels = inputs_for(parent, batch=4)["pixel_values"].numpy()  # (4, 1, 8, 8): what `a` reads
    Dataset.from_dict({"pixel_values": pixels, "label": [0, 1, 2, 0]}).save_to_disk(work / "pixels")
    Dataset.from_dict({"pixel_values": np.zeros((4, 1, 12, 12), np.float32)}).save_to_disk(work / "pixels-12")
    Dataset.from_dict({"pixel_values": np.zeros((4, 3, 8, 8), np.float32)}).save_to_disk(work / "pixels-rgb")
    Dataset.from_dict({"image": [Image.fromarray(np.zeros((8, 8), np.uint8))] * 4}).save_to_disk(work / "images")
    Dataset.from_dict({"pixel_values": pixels[:0]}).save_to_disk(work / "no-rows")  # saved without a data file
    Dataset.from_dict({"pixel_values": pixels}).filter(lambda row: False).save_to_disk(work / "filtered-out")
    DatasetDict({"train": Dataset.from_dict({"pixel_values": pixels}), "test": Dataset.from_dict(
        {"pixel_values": pixels[:0], "label": []})}).save_to_disk(work / "empty-test")  # fmt: skip
    (work / "header-only.csv").write_text("text,label\n")
    (work / "one-row.csv").write_text("text,label\ngood film,0\n")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    text = build("bert-seqcls")  # max_position_embeddings=24
    text.save_pretrained(work / "ta")
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(work / "ta")
    permute_model(text, seed=1).save_pretrained(work / "tb")
    Dataset.from_dict({"text": ["good film", "bad film"] * 2, "label": [0, 1] * 2}).save_to_disk(work / "text")
    roberta = build("roberta-seqcls")  # 24 positions, 2 of them before the first token's
    roberta.save_pretrained(work / "ra")
    permute_model(roberta, seed=1).save_pretrained(work / "rb")
    Dataset.from_dict({"input_ids": np.full((4, 23), 5)}).save_to_disk(work / "ids-23")


FUSE = ["fuse", "a", "b", "--cost", "weights", "-q"]
DATA = ["fuse", "a", "b", "--out", "fused", "-q", "--data"]
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
    ([*FUSE, "--out", "fused", "--residual", "orthogonal", "--method", "vanilla"], 2,
     "residual='orthogonal' rotates what OT aligns: it needs method='ot' (or align='ot' before a same-base method)"),
    ([*FUSE, "--out", "fused", "--within-heads", "orthogonal", "--solver", "sinkhorn"], 2,
     "within_heads='orthogonal' rotates dims inside matched heads: it needs heads='aware', solver='exact'"),
    (["fuse", "a", "b", "--out", "fused", "--refine-steps", "3", "-q"], 2,
     "This fusion (cost=activations, refine_steps=3) needs alignment data"),
    (["fuse", "a", "b", "--out", "fused", "--cost", "weights", "--refine-steps", "3", "-q"], 2,
     "This fusion (refine_steps=3) needs alignment data"),  # data-free maps, refined on data
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
    ([*FUSE, "--out", "fused", "--push-to-hub", "ns/bad--name"], 2,
     "--push-to-hub: 'ns/bad--name' is not a valid Hub repository id"),
    ([*FUSE, "--out", "fused", "--multi-task", "--method", "interpolate", "--task-names", "x", "y.", "--push-to-hub",
      "ns/m"], 2, "--push-to-hub: 'ns/m-y.' is not a valid Hub repository id"),
    (["fuse", "a", "tâche", "--cost", "weights", "-q", "--out", "fused", "--multi-task", "--method", "interpolate",
      "--push-to-hub", "ns/m"], 2, "--push-to-hub: 'ns/m-tâche' is not a valid Hub repository id (`name` or "
     "`namespace/name`: letters, digits, '-', '_', '.', no '--' or '..', at most 96 characters); choose another "
     "repository, or name the tasks with --task-names."),
    (["fuse", "a", "b", "--out", "fused", "--refine-weights", "-q"], 2,
     "refine_weights shape(s) the learned refinement, which refine_steps=0 turns off"),
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
    # data the anchor cannot read, refused by the pre-flight (`--dry-run` downloads nothing and passed them before)
    ([*DATA, "pixels-12", "--dry-run"], 2, "--data pixels-12 reaches the model as 1-channel 12x12 images, but "
     "ViTForImageClassification takes 1-channel 8x8 images (config num_channels=1, image_size=8); give pixel_values "
     "of shape (1, 8, 8)"),
    ([*DATA, "pixels-rgb"], 2, "--data pixels-rgb reaches the model as 3-channel 8x8 images, but "
     "ViTForImageClassification takes 1-channel 8x8 images"),
    (["fuse", "a12", "b", "--out", "fused", "-q", "--data", "images", "--dry-run"], 2, "--data images reaches the "
     "model as 1-channel 12x12 images, but ViTForImageClassification takes 1-channel 8x8 images (config "
     "num_channels=1, image_size=8); set the anchor's image processor (preprocessor_config.json) to resize to 8x8"),
    (["inspect", "a", "b", "--data", "pixels-12", "-q"], 2, "--data pixels-12 reaches the model as 1-channel 12x12 "
     "images, but ViTForImageClassification takes 1-channel 8x8 images"),
    ([*DATA, "pixels", "--eval-data", "pixels-12", "--dry-run"], 2, "--eval-data pixels-12 reaches the model as "
     "1-channel 12x12 images"),
    (["fuse", "ta", "tb", "--out", "fused", "-q", "--data", "text", "--max-length", "30", "--dry-run"], 2,
     "--data text reaches the model as sequences of 30 tokens, but BertForSequenceClassification takes at most 24 "
     "(max_position_embeddings=24); pass --max-length 24 or less."),
    (["fuse", "ra", "rb", "--out", "fused", "-q", "--data", "ids-23"], 2, "--data ids-23 reaches the model as "
     "sequences of 23 tokens, but RobertaForSequenceClassification takes at most 22 (max_position_embeddings=24 less "
     "the 2 positions numbered before the first token); truncate its input_ids to 22 tokens or fewer."),
    ([*DATA, "images", "--dry-run"], 2, "The data has no model input columns (['input_ids', 'pixel_values']), "
     "only ['image']; pass the model's tokenizer or image processor so the raw text or images can be encoded. The "
     "anchor (a) ships no tokenizer or image processor files, so give data that already holds model inputs."),
    ([*DATA, "no-rows", "--dry-run"], 2, "Data source 'no-rows' has no rows in the saved Dataset; give data with at "
     "least one example"),
    ([*DATA, "filtered-out"], 2, "Data source 'filtered-out' has no rows in the saved Dataset"),
    ([*DATA, "header-only.csv"], 2, "Data source 'header-only.csv' has no rows in split 'train'; give data with"),
    ([*DATA, "empty-test", "--eval-data", "empty-test"], 2, "Data source 'empty-test' has no rows in split 'test'"),
    ([*DATA, "pixels", "--eval-data", "pixels", "--eval-split", "test"], 2,
     "pixels holds a single Dataset, not a DatasetDict, so it has no split 'test'; leave the split out."),
    ([*DATA, "pixels", "--split", "validation"], 2, "pixels holds a single Dataset, not a DatasetDict, so it has no"),
    ([*DATA, "pixels", "--eval-data", "one-row.csv", "--eval-split", "test"], 2,
     "one-row.csv has no split 'test'; available splits: ['train']."),
    # too few batches for refinement to hold one back, refused by the pre-flight (before any download)
    ([*DATA, "pixels", "--quality", "best", "--dry-run"], 2, "refine_steps and quality='best' need at least 5 "
     "batches of alignment data (every 5th is held back to judge the fusion); got 1. Pass more data or lower "
     "batch_size."),
    ([*DATA, "pixels", "--refine-steps", "5", "--batch-size", "1"], 2, "refine_steps and quality='best' need at "
     "least 5 batches of alignment data (every 5th is held back to judge the fusion); got 4."),
    # target and width problems, refused by the pre-flight
    ([*FUSE, "--out", "fused", "--target", "hidden_size=64", "--dry-run"], 2,
     "The target has 64 units in space 'residual' where the anchor has 32: a target compresses, it cannot widen."),
    ([*FUSE, "--out", "fused", "--target", "hidden_size=30", "--dry-run"], 2,
     "The target {'hidden_size': 30} does not give a valid model: Space qk.0 (30 units) does not split into 4 heads"),
    (["fuse", "ta", "tb", "--out", "fused", "--cost", "weights", "--target", "num_attention_heads=3", "--dry-run"], 2,
     "The target {'num_attention_heads': 3} does not give a valid BertForSequenceClassification: The hidden size "
     "(32) is not a multiple of the number of attention heads (3). Choose sizes that divide evenly"),
    (["fuse", "a", "wide", "--out", "fused", "--method", "vanilla", "--dry-run"], 2, "Parent 1 has 48 units in "
     "space 'residual' but the anchor (parent 0) has 32: method='vanilla' averages tensors as they are"),
    (["fuse", "a", "wide", "--out", "fused", "--method", "interpolate", "--dry-run"], 2, "Parent 1 has 48 units in "
     "space 'residual' but the anchor (parent 0) has 32: method='interpolate'"),
    (["fuse", "a", "wide", "--out", "fused", "--method", "task-arithmetic", "--base", "a", "--dry-run"], 2,
     "Parent 1 has 48 units in space 'residual' but the anchor (parent 0) has 32: method='task-arithmetic'"),
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


@pytest.mark.parametrize(
    "argv",
    [
        [*DATA, "pixels-12"],
        ["fuse", "a12", "b", "--out", "fused", "-q", "--data", "images"],
        ["fuse", "ta", "tb", "--out", "fused", "-q", "--data", "text", "--max-length", "30"],
        [*DATA, "header-only.csv"],
        [*DATA, "pixels", "--eval-data", "pixels", "--eval-split", "test"],
        [*FUSE, "--out", "fused", "--target", "hidden_size=64"],
        ["fuse", "a", "wide", "--out", "fused", "--method", "interpolate"],
    ],
    ids=" ".join,
)
def test_bad_data_and_targets_fail_before_any_weight_is_downloaded(workdir, monkeypatch, capsys, argv):
    """The real run, not only `--dry-run`, refuses them in the pre-flight: the download step is never reached."""

    def download(*args, **kwargs):
        raise AssertionError("weights were downloaded before the bad input was refused")

    monkeypatch.chdir(workdir)
    monkeypatch.setattr("hf_otfusion.job.run.download_parents", download)
    assert run(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "downloaded" not in error and "Traceback" not in error
    assert not (workdir / "fused").exists()


def test_data_that_fits_passes_the_dry_run_which_writes_no_cache_file_next_to_it(workdir, monkeypatch, capsys):
    """At the limit (24 positions) the text passes; reading and encoding data leaves the data sets as they were."""
    monkeypatch.chdir(workdir)
    before = {name: sorted(p.name for p in (workdir / name).iterdir()) for name in ("text", "images")}
    text = ["fuse", "ta", "tb", "--out", "fused", "-q", "--data", "text", "--max-length", "24", "--num-samples", "3"]
    assert run([*text, "--dry-run"]) == 0
    assert "rows 3" in capsys.readouterr().out
    assert run(["fuse", "a12", "b", "--out", "fused", "-q", "--data", "images", "--dry-run"]) == 2
    assert {name: sorted(p.name for p in (workdir / name).iterdir()) for name in before} == before
    assert not (workdir / "fused").exists()
