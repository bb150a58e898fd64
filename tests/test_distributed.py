"""Invariant 5: statistics and fused weights from 2 processes (torchrun, gloo on CPU) equal those of 1 process;
and the device the passes run on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build, inputs_for
from distributed_worker import BEST_CONFIG
from safetensors.torch import load_file

from hf_otfusion import FusionConfig, fuse, fuse_with_diagnostics
from hf_otfusion.cli import main
from hf_otfusion.engine.distributed import models_on, owned_batches, resolve_device
from hf_otfusion.engine.plan import resolve_plan
from hf_otfusion.engine.statistics import collect_statistics
from hf_otfusion.errors import DeviceUnavailableError
from hf_otfusion.hub.server import HubServer

WORKER = Path(__file__).with_name("distributed_worker.py")
SAMPLES, BATCH_SIZE = 19, 4  # 5 batches, the last one of 3 samples: 3 batches on process 0, 2 on process 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two saved BERT parents, a saved alignment set, and the 2-process run of the worker over them."""
    workdir = tmp_path_factory.mktemp("distributed")
    parents = [build("bert-seqcls", seed=0), build("bert-seqcls", seed=1)]
    for name, parent in zip("ab", parents, strict=True):
        parent.save_pretrained(workdir / name)
    from datasets import Dataset

    inputs = inputs_for(parents[0], batch=SAMPLES, seed=4)  # rows from the middle on are padded
    Dataset.from_dict({key: value.numpy() for key, value in inputs.items()}).save_to_disk(str(workdir / "align"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_XET="1")
    env.update(HF_TOKEN="test-token-not-secret", HF_HOME=str(workdir / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    with HubServer(workdir / "hub") as hub:  # the CLI pushes its output here (huggingface_hub reads HF_ENDPOINT)
        env["HF_ENDPOINT"] = hub.url
        process = subprocess.run([*command, str(workdir)], capture_output=True, text=True, timeout=240, env=env)
        commits = [path for method, path in hub.request_log if method == "POST" and "/commit/" in path]
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(2)]
    return workdir, parents, ranks, process.stdout + process.stderr, commits


def test_torchrun_starts_two_gloo_processes_that_split_the_batches_without_padding(run):
    _, _, ranks, _, _ = run
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert {r["backend"] for r in ranks} == {"gloo"}
    # the statistics pass and the CLI's fusion each ran both parents on process 0's batches 0, 2, 4 (4 + 4 + 3
    # samples) and on process 1's batches 1, 3 (4 + 4): every sample once, none padded in
    counted = [{phase: r["samples"][phase] for phase in ("statistics", "cli")} for r in ranks]
    assert counted == [{"statistics": 2 * 11, "cli": 2 * 11}, {"statistics": 2 * 8, "cli": 2 * 8}]


def test_statistics_summed_over_two_processes_equal_the_single_process_statistics(run):
    workdir, parents, _, _, _ = run
    from datasets import load_from_disk

    data = load_from_disk(str(workdir / "align"))
    plans = [resolve_plan(parent) for parent in parents]
    single = collect_statistics(parents, plans, data, anchor=0, batch_size=BATCH_SIZE, progress=False)[1]
    summed = np.load(workdir / "stats.npz")
    assert {name.split("|")[0] for name in summed.files} == set(single)
    tokens = int(torch.tensor(data["attention_mask"]).sum())
    for key, stats in single.items():
        assert int(summed[f"{key}|count"]) == stats.count
        assert stats.count in (tokens, SAMPLES)  # every token of every sample once (a pooler counts samples)
        for field in ("mean_a", "mean_b", "m2_a", "m2_b", "comoment"):
            expected, actual = getattr(stats, field), summed[f"{key}|{field}"]
            error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
            assert error < 1e-12, (key, field, error)


def test_cli_under_torchrun_writes_and_pushes_one_checkpoint_equal_to_the_single_process_one(run, tmp_path):
    workdir, _, ranks, output, commits = run
    assert [r["cli_exit"] for r in ranks] == [0, 0]
    assert commits == ["/api/models/ns/fused/commit/main"]  # one push, from the main process
    assert [len(r["saves"]) for r in ranks] == [1, 0]  # only the main process saved
    # every message once: the other process neither logs nor prints (the CLI ran without -q)
    assert output.lower().count("written to") == 1
    assert output.count("Activation statistics from") == 2  # the CLI's fusion and the worker's quality one, once each
    assert "Loading weights" not in output
    assert sorted(p.name for p in workdir.iterdir() if "fused" in p.name) == ["fused"]  # no staging left behind
    args = ["fuse", str(workdir / "a"), str(workdir / "b"), "--data", str(workdir / "align")]
    assert main([*args, "--out", str(tmp_path / "single"), "--batch-size", str(BATCH_SIZE), "-q"]) == 0
    distributed, single = (
        load_file(workdir / "fused" / "model.safetensors"),
        load_file(tmp_path / "single" / "model.safetensors"),
    )
    assert distributed.keys() == single.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(distributed[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_repair_and_refinement_under_torchrun_equal_the_single_process_fusion(run):
    workdir, parents, _, _, _ = run
    from datasets import load_from_disk

    config = FusionConfig(repair="all", refine_steps=4, batch_size=BATCH_SIZE)
    single = fuse(parents, data=load_from_disk(str(workdir / "align")), config=config, progress=False).state_dict()
    distributed = load_file(workdir / "quality.safetensors")
    assert distributed.keys() == single.keys()
    for name, tensor in single.items():
        # statistics summed in another order give rotations equal to ~1e-12; the float32 steps of refinement and
        # repair carry that to 1e-6..3e-5 (it varies between runs), far below any change of function
        torch.testing.assert_close(distributed[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_best_quality_under_torchrun_keeps_one_candidate_on_every_process_as_one_process_would(run):
    workdir, parents, ranks, _, _ = run
    from datasets import load_from_disk

    single = fuse_with_diagnostics(parents, data=load_from_disk(str(workdir / "align")), config=BEST_CONFIG,
                                   progress=False)  # fmt: skip
    assert ranks[0]["choice"] == ranks[1]["choice"]
    assert ranks[0]["choice"]["kept"] == single.choice.kept
    assert ranks[0]["choice"]["held_back_loss"] == pytest.approx(single.choice.held_back_loss, rel=1e-4)
    on_processes = [load_file(workdir / f"best{r}.safetensors") for r in range(2)]
    for name, tensor in single.model.state_dict().items():
        assert torch.equal(on_processes[0][name], on_processes[1][name]), name  # one model, whichever process
        torch.testing.assert_close(on_processes[0][name], tensor, rtol=1e-4, atol=1e-4, msg=name)


def test_every_batch_belongs_to_exactly_one_process():
    for num_batches in range(0, 12):
        for processes in (1, 2, 3, 5):
            shards = [list(owned_batches(num_batches, rank, processes)) for rank in range(processes)]
            assert sorted(b for shard in shards for b in shard) == list(range(num_batches))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_models_visit_the_device_and_get_their_own_tensors_back():
    model = build("bert-mlm")
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    buffers = {name: b.data_ptr() for name, b in model.named_buffers()}
    with models_on([model, model], torch.device("meta")):  # a device that is not the CPU, on any machine
        assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert {name: b.data_ptr() for name, b in model.named_buffers()} == buffers
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_asking_for_cuda_without_a_gpu_fails_before_any_work():
    assert resolve_device("auto") == torch.device("cpu")
    parent = build("vit-cls")
    with pytest.raises(DeviceUnavailableError, match="no CUDA GPU.*device='cpu'"):
        fuse([parent, parent], config=FusionConfig(cost="weights"), device="cuda", progress=False)


def test_a_cpu_device_fuses_exactly_as_leaving_the_models_in_place():
    parents = [build("vit-cls", seed=0), build("vit-cls", seed=1)]
    data = [inputs_for(parents[0], seed=s) for s in range(2)]
    config = FusionConfig()  # activation statistics, exact maps
    here = fuse(parents, data=data, config=config, progress=False)
    on_cpu = fuse(parents, data=data, config=config, progress=False, device="cpu")
    for (name, a), (_, b) in zip(here.named_parameters(), on_cpu.named_parameters(), strict=True):
        assert torch.equal(a, b), name
