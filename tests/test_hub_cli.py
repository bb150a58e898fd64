"""`otfusion-hub` against the local Hub server, driven by the real huggingface_hub / transformers / datasets clients.

One server per module; one subprocess uploads every repo the tests use (parents, broken parents, a data set).
The end-to-end test fuses Hub parents with Hub alignment data, pushes, loads the pushed model at the printed
SHA and rebuilds it from the card's pinned command; the error test walks through every bad input.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
import transformers as T
from hub_utils import client_env, run_cli, run_python
from huggingface_hub import ModelCard

from hf_otfusion.hub.server import HubServer

HEADER_READ_BYTES = 100_001  # what HfApi.get_safetensors_metadata fetches of a weight file (Range 0-100000)

UPLOAD = r"""
import json, os
import numpy as np
import torch
from datasets import Dataset
from huggingface_hub import HfApi
from safetensors.torch import load_file
from conftest import build
from hf_otfusion import permute_model

api = HfApi()
commits, sizes = {}, {}

def upload(repo, folder):
    api.create_repo(repo, exist_ok=True)
    commits[repo] = api.upload_folder(repo_id=repo, folder_path=folder).oid
    weights = [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    sizes[repo] = sum(os.path.getsize(os.path.join(folder, name)) for name in weights)

shape = dict(hidden_size=48, intermediate_size=96)  # > 100 kB of weights, more than a header read
parent = build("vit-cls", **shape)
parent.save_pretrained("a")
with open("a/README.md", "w") as f:
    f.write("---\nlicense: apache-2.0\n---\n# a\n")
open("a/preprocessor_config.json", "w").write(json.dumps({"image_processor_type": "ViTImageProcessor",
    "do_resize": False, "do_rescale": False, "image_mean": [0.5], "image_std": [0.5]}))
upload("ns/a", "a")
permute_model(parent, seed=1).save_pretrained("b", max_shard_size="100KB")  # a sharded parent, with an index
with open("b/README.md", "w") as f:
    f.write("---\nlicense: apache-2.0\n---\n# b\n")
upload("ns/b", "b")
build("vit-cls", num_hidden_layers=3, **shape).save_pretrained("deep")
upload("ns/deep", "deep")

data = open("a/model.safetensors", "rb").read()
os.makedirs("corrupt"); os.system("cp a/config.json corrupt/")
open("corrupt/model.safetensors", "wb").write(b"\x00" * 8 + b"not a safetensors file" * 100)
upload("ns/corrupt", "corrupt")
os.makedirs("truncated"); os.system("cp a/config.json truncated/")
open("truncated/model.safetensors", "wb").write(data[:-500])  # header intact, last tensor cut short
upload("ns/truncated", "truncated")
os.makedirs("pickled"); os.system("cp a/config.json pickled/")
open("pickled/pytorch_model.bin", "wb").write(b"pickle bytes that must never be unpickled")
api.create_repo("ns/pickled"); api.upload_folder(repo_id="ns/pickled", folder_path="pickled")
os.makedirs("remote"); os.system("cp a/model.safetensors remote/")
config = json.load(open("a/config.json"))
config.update(architectures=["CustomViT"], auto_map={"AutoModelForImageClassification": "modeling.CustomViT"})
json.dump(config, open("remote/config.json", "w"))
api.create_repo("ns/remote"); api.upload_folder(repo_id="ns/remote", folder_path="remote")

rng = np.random.default_rng(0)
rows = Dataset.from_dict({"pixel_values": rng.normal(size=(40, 1, 8, 8)).astype(np.float32),
                          "label": rng.integers(0, 3, 40)})
api.create_repo("ns/align", repo_type="dataset")
rows.select(range(24)).to_parquet("train.parquet"); rows.select(range(24, 40)).to_parquet("test.parquet")
api.upload_file(path_or_fileobj="train.parquet", path_in_repo="data/train-0.parquet", repo_id="ns/align",
                repo_type="dataset")
commits["ns/align"] = api.upload_file(path_or_fileobj="test.parquet", path_in_repo="data/test-0.parquet",
                                      repo_id="ns/align", repo_type="dataset").oid
torch.save(rows.with_format("torch")[:]["pixel_values"][:8], "probe.pt")
params = sum(t.numel() for t in load_file("a/model.safetensors").values())
print("RESULT " + json.dumps({"commits": commits, "sizes": sizes, "params": params}))
"""


def _result(proc) -> dict:
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A running server holding the parents, broken parents and the alignment data set."""
    root = tmp_path_factory.mktemp("hub")
    with HubServer(root / "store") as server:
        work = root / "upload"
        work.mkdir()
        uploaded = _result(run_python(UPLOAD, client_env(server.url, root / "upload-home"), work))
        server.uploaded = uploaded
        server.probe = work / "probe.pt"
        yield server


def test_fuse_push_load_at_sha_and_rebuild_from_the_card(hub, tmp_path):
    commits = hub.uploaded["commits"]
    env = client_env(hub.url, tmp_path / "home")
    fuse = ["fuse", "ns/a", "ns/b", "--out", "fused", "--data", "ns/align", "--num-samples", "16",
            "--eval-data", "ns/align", "--push-to-hub", "ns/fused", "-q"]  # fmt: skip
    proc = run_cli(fuse, env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    sha = re.search(r"^commit: ([0-9a-f]{40})$", proc.stdout, re.M).group(1)
    assert re.search(r"^\| vanilla average \| \d\.\d{4} \| \d+\.\d{4} \|$", proc.stdout, re.M)
    assert re.search(rf"^url: {re.escape(hub.url)}/ns/fused/commit/{sha}$", proc.stdout, re.M)
    out = tmp_path / "fused"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "fusion_config.yaml", "fusion_job.yaml", "fusion_provenance.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]  # fmt: skip
    provenance = json.loads((out / "fusion_provenance.json").read_text())
    assert [p["commit"] for p in provenance["parents"]] == [commits["ns/a"], commits["ns/b"]]
    assert provenance["alignment_data"]["commit"] == commits["ns/align"]
    assert provenance["alignment_data"]["num_rows"] == 16 and provenance["alignment_data"]["split"] == "train"
    assert "test-token-not-secret" not in "".join(p.read_text() for p in out.iterdir() if p.suffix != ".safetensors")
    assert "test-token-not-secret" not in proc.stdout + proc.stderr

    reproduce = tmp_path / "reproduce"
    reproduce.mkdir()
    (reproduce / "fusion_config.yaml").write_text((out / "fusion_config.yaml").read_text())
    check = f"""
        import json, sys, torch
        from datasets import Dataset
        from huggingface_hub import HfApi, ModelCard, hf_hub_download
        from transformers import AutoModelForImageClassification
        from hf_otfusion.cli import main

        model = AutoModelForImageClassification.from_pretrained("ns/fused", revision="{sha}").eval()
        with torch.no_grad():
            torch.save(model(pixel_values=torch.load("{hub.probe}")).logits, "hub_logits.pt")
        card = ModelCard.load(hf_hub_download("ns/fused", "README.md", revision="{sha}"))
        json.dump(card.data.to_dict(), open("card.json", "w"))
        # The alignment data moves on; the card's command is pinned to the commit that was used.
        moved = Dataset.from_dict({{"pixel_values": torch.zeros(24, 1, 8, 8).numpy(), "label": [0] * 24}})
        moved.to_parquet("new.parquet")
        HfApi().upload_file(path_or_fileobj="new.parquet", path_in_repo="data/train-0.parquet", repo_id="ns/align",
                            repo_type="dataset")
        sys.exit(main({shlex.split(provenance["reproduce"])[1:]!r} + ["-q"]))
        """
    proc = run_python(check, env, reproduce)
    assert proc.returncode == 0, proc.stderr[-6000:]

    local = T.AutoModelForImageClassification.from_pretrained(out).eval()
    parent = T.AutoModelForImageClassification.from_pretrained(tmp_path / "home" / "hub" / "models--ns--a" /
                                                               "snapshots" / commits["ns/a"]).eval()  # fmt: skip
    probe = torch.load(hub.probe)
    with torch.no_grad():
        local_logits, parent_logits = local(pixel_values=probe).logits, parent(pixel_values=probe).logits
    assert torch.equal(torch.load(reproduce / "hub_logits.pt"), local_logits)
    # ns/b is a permuted copy of ns/a, so exact OT fusion gives ns/a back
    assert ((local_logits - parent_logits).norm() / parent_logits.norm()).item() < 1e-4

    card = json.loads((reproduce / "card.json").read_text())
    assert card == ModelCard.load(out / "README.md").data.to_dict()
    assert card["base_model"] == ["ns/a", "ns/b"] and card["base_model_relation"] == "merge"
    assert card["license"] == "apache-2.0" and card["datasets"] == ["ns/align"]
    assert set(card["tags"]) >= {"merge", "model-fusion", "optimal-transport", "hf-otfusion", "vit"}
    metrics = card["model-index"][0]["results"][0]["metrics"]
    fused_row = next(r for r in provenance["evaluation"]["rows"] if r["name"] == "fused")
    assert metrics[0] == {"type": "accuracy", "value": fused_row["accuracy"], "name": "Accuracy"}
    text = (out / "README.md").read_text()
    for repo in ("ns/a", "ns/b"):
        assert f"`{commits[repo]}`" in text
    rebuilt = reproduce / "fused" / "model.safetensors"
    assert rebuilt.read_bytes() == (out / "model.safetensors").read_bytes()


def test_bad_inputs_fail_clearly_and_leave_nothing_behind(hub, tmp_path):
    commits = hub.uploaded["commits"]
    hub.fail_next_commits = 1  # the first upload of this test fails on the server
    before_requests, before_downloads = len(hub.request_log), len(hub.download_log)
    script = """
        import contextlib, io, json, os, urllib.error, urllib.request
        from hf_otfusion.cli import main

        def run(*args):
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    code = main([*args, "-q"] if args[0] == "fuse" else list(args))
                except SystemExit as exit:
                    code = exit.code
            return {"code": code, "err": err.getvalue(), "out": out.getvalue()}

        results = {"incompatible": run("fuse", "ns/a", "ns/deep", "--out", "o-incompatible", "--cost", "weights")}
        try:  # a marker in the server's request log: everything before it belongs to the incompatible run
            urllib.request.urlopen(os.environ["HF_ENDPOINT"] + "/api/models/marker/incompatible-done")
        except urllib.error.HTTPError:
            pass
        results["upload"] = run("fuse", "ns/a", "ns/b", "--out", "o-push", "--cost", "weights",
                                "--push-to-hub", "ns/pushed", "--revision", "dev")
        results["retry"] = run(*results["upload"]["err"].split("retry the upload with:")[1].split()[1:])
        results["pr"] = run("push", "o-push", "ns/pushed", "--create-pr")
        results["private"] = run("push", "o-push", "ns/private-copy", "--private")
        from huggingface_hub import HfApi
        results["private"]["is_private"] = HfApi().model_info("ns/private-copy").private
        os.makedirs("o-existing"); open("o-existing/keep.txt", "w").write("mine")
        cases = {
            "unknown-repo": ["ns/a", "ns/nope"], "unknown-revision": ["ns/a", "ns/b@no-such-branch"],
            "corrupt": ["ns/a", "ns/corrupt"], "truncated": ["ns/a", "ns/truncated"], "pickle": ["ns/a", "ns/pickled"],
            "remote-code": ["ns/a", "ns/remote"], "existing": ["ns/a", "ns/b"],
        }
        for name, parents in cases.items():
            out = "o-existing" if name == "existing" else f"o-{name}"
            results[name] = run("fuse", *parents, "--out", out, "--cost", "weights")
        for name, data in {"unknown-data-revision": "ns/align@no-such-branch", "unknown-data": "ns/no-data"}.items():
            results[name] = run("fuse", "ns/a", "ns/b", "--out", f"o-{name}", "--data", data)
        results["dry-run"] = run("fuse", "ns/a", "ns/b@" + COMMIT_B, "--out", "o-dry", "--data", "ns/align",
                                 "--dry-run")
        results["leftovers"] = sorted(os.listdir("."))
        print("RESULT " + json.dumps(results))
        """.replace("COMMIT_B", repr(commits["ns/b"]))
    results = _result(run_python(script, client_env(hub.url, tmp_path / "home"), tmp_path))

    incompatible = results["incompatible"]
    assert incompatible["code"] == 2 and "3 layers but the anchor (parent 0) has 2" in incompatible["err"]
    # Pre-flight read only the safetensors headers (Range reads: the header, then its 8-byte length prefix for the
    # exact-size check) of the incompatible pair, no whole weight file.
    requests = hub.request_log[before_requests:]
    marker = requests.index(("GET", "/api/models/marker/incompatible-done"))
    weight_gets = [path for method, path in requests[:marker] if method == "GET" and path.endswith(".safetensors")]
    assert sorted(weight_gets) == 2 * ["/ns/a/resolve/" + commits["ns/a"] + "/model.safetensors"] + 2 * [
        "/ns/deep/resolve/" + commits["ns/deep"] + "/model.safetensors"]  # fmt: skip
    served = [(path, size) for path, size in hub.download_log[before_downloads:] if path.endswith(".safetensors")]
    served = served[: len(weight_gets)]  # the file bodies those GETs received, in order
    assert [path for path, _ in served] == weight_gets
    sizes = hub.uploaded["sizes"]
    assert max(size for _, size in served) <= HEADER_READ_BYTES < min(sizes["ns/a"], sizes["ns/deep"])

    upload, retry = results["upload"], results["retry"]
    assert upload["code"] == 3 and "Fused model written to o-push" in upload["out"]
    assert "retry the upload with:\n  otfusion-hub push o-push ns/pushed --revision dev" in upload["err"]
    assert retry["code"] == 0 and re.search(r"^commit: [0-9a-f]{40}$", retry["out"], re.M)
    assert "revision dev" in retry["out"]
    assert results["pr"]["code"] == 0 and re.search(r"^url: .*/ns/pushed/discussions/1$", results["pr"]["out"], re.M)
    assert results["private"]["code"] == 0 and results["private"]["is_private"] is True

    expected = {
        "unknown-repo": "no model repository 'ns/nope'",
        "unknown-revision": "ns/b has no revision 'no-such-branch'",
        "corrupt": "ns/corrupt@",
        "truncated": "the file is truncated. Re-upload it",
        "pickle": "--allow-pickle",
        "remote-code": "--trust-remote-code",
        "existing": "o-existing exists and is not empty",
        "unknown-data-revision": "Data set ns/align has no revision 'no-such-branch'",
        "unknown-data": "no dataset repository 'ns/no-data'",
    }
    for name, message in expected.items():
        assert results[name]["code"] == 2, (name, results[name])
        assert message in results[name]["err"], (name, results[name]["err"])
    assert "corrupt or not safetensors" in results["corrupt"]["err"]
    # caught in pre-flight, from the header and the file size, not after downloading it
    assert re.search(r"ns/truncated@[0-9a-f]{40}: model.safetensors is [\d,]+ bytes but its header describes",
                     results["truncated"]["err"])  # fmt: skip
    dry = results["dry-run"]
    assert dry["code"] == 0 and f"ns/b@{commits['ns/b']}" in dry["out"]
    assert re.search(r"Alignment data: ns/align@[0-9a-f]{40} \(hub\), split train, rows all", dry["out"])
    params = f"{hub.uploaded['params']:,} params"
    assert re.search(rf"\[anchor\] ns/a@{commits['ns/a']} +ViTForImageClassification, {params}", dry["out"])
    assert "nothing was written" in dry["out"]
    # Only the pushed output and the user's own directory exist: no failed run left a file or a staging dir.
    assert [name for name in results["leftovers"] if name.startswith(("o-", ".o-"))] == ["o-existing", "o-push"]
    assert (tmp_path / "o-existing" / "keep.txt").read_text() == "mine"


def test_the_simplest_fuse_command_runs_data_free_from_the_hub(hub, tmp_path):
    proc = run_cli(["fuse", "ns/a", "ns/b", "--out", "fused"], client_env(hub.url, tmp_path / "home"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stderr.count("No --data: fusing data-free") == 1
    assert proc.stdout.count("written to") == 1
    card = (tmp_path / "fused" / "README.md").read_text()
    assert "data-free" in card and "`cost=weights`" in card
    assert ModelCard.load(tmp_path / "fused" / "README.md").data.base_model == ["ns/a", "ns/b"]


def test_readme_hub_blocks_run_against_the_local_hub(hub, tmp_path):
    from test_readme import BLOCKS, readme_block

    stand_ins = {"user/vit-a": "ns/a", "user/vit-b": "ns/b", "user/images": "ns/align", "num_samples=500":
                 "num_samples=16", "user/vit-fused": "ns/readme-fused"}  # fmt: skip
    blocks = [readme_block(block, stand_ins) for block in BLOCKS if "user/" in block]
    assert blocks and not any("user/" in block for block in blocks)
    script = "from huggingface_hub import HfApi\nHfApi().create_tag('ns/b', tag='v1.0')\n" + "\n".join(blocks)
    proc = run_python(script, client_env(hub.url, tmp_path / "home"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert re.search(r"^[0-9a-f]{40}$", proc.stdout, re.M)  # the pushed commit
    assert (tmp_path / "fused" / "model.safetensors").is_file()


def test_a_push_that_changes_nothing_says_so_and_keeps_the_head(hub, tmp_path):
    env = client_env(hub.url, tmp_path / "home")
    folder = tmp_path / "model"
    from conftest import build

    build("vit-cls").save_pretrained(folder)
    first = run_cli(["push", str(folder), "ns/unchanged", "-q"], env, tmp_path)
    second = run_cli(["push", str(folder), "ns/unchanged", "-q"], env, tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    assert first.stdout.startswith("Pushed ") and second.stdout.startswith("No changes: ns/unchanged@main")
    shas = [re.search(r"^commit: ([0-9a-f]{40})$", p.stdout, re.M).group(1) for p in (first, second)]
    assert shas[0] == shas[1]  # the head the first push made, no empty commit on top
