"""The local Hub server, driven by the REAL huggingface_hub and transformers clients.

huggingface_hub reads HF_ENDPOINT once, at import, so every client-side check runs in a fresh Python
subprocess pointed at a server that the test started on port 0 in its own tmp dir. The subprocess prints
one ``RESULT <json>`` line that the test asserts on; stdlib-only checks (Range, HEAD headers, content
addressing) run in-process with urllib.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hf_otfusion.hub.server import HubServer, commit_sha

CLIENT_TIMEOUT_S = 120
TOKEN = "hub-server-test-token"  # not the conftest default: proves `token=` reaches the checks


@pytest.fixture
def hub(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with HubServer(tmp_path / "hub-root", token=TOKEN) as server:
        yield server
    # The real clients must only have used routes the server implements.
    records = caplog.get_records("setup") + caplog.get_records("call")
    unsupported = [r.getMessage() for r in records if "unsupported route" in r.getMessage()]
    assert not unsupported, unsupported


def run_client(hub: HubServer, tmp_path: Path, script: str, token: str | None = TOKEN) -> dict:
    """Run ``script`` in a subprocess whose huggingface_hub talks to ``hub`` with HF_TOKEN=``token`` (None: no
    token at all); return its RESULT json."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    home = tmp_path / "hf-home"
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    prelude = "import json, sys\ndef result(obj):\n    print('RESULT ' + json.dumps(obj))\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _resolve_gets(hub: HubServer) -> list[str]:
    return [path for method, path in hub.request_log if method == "GET" and "/resolve/" in path]


def test_transformers_roundtrip_pinned_by_sha(hub: HubServer, tmp_path: Path) -> None:
    """A tiny BERT pushed in one commit loads back bit-identical by SHA, even after main moves on."""
    out = run_client(
        hub,
        tmp_path,
        """
        import hashlib, shutil
        import torch
        from huggingface_hub import HfApi, hf_hub_download, get_safetensors_metadata
        from transformers import AutoModel, BertConfig, BertModel

        api = HfApi()
        cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24)
        torch.manual_seed(0)
        model = BertModel(cfg).eval()
        model.save_pretrained("tiny")
        shutil.copy("tiny/model.safetensors", "v1.safetensors")
        url = api.create_repo("ns/a")
        commits_before = len(api.list_repo_commits("ns/a"))
        info1 = api.upload_folder(repo_id="ns/a", folder_path="tiny", commit_message="v1")
        sha1 = info1.oid
        commits_after = len(api.list_repo_commits("ns/a"))
        mi = api.model_info("ns/a")
        mi_rev = api.model_info("ns/a", revision=sha1)

        loaded = AutoModel.from_pretrained("ns/a", revision=sha1)
        pairs = zip(model.state_dict().values(), loaded.state_dict().values())
        same = all(torch.equal(a, b) for a, b in pairs)
        same_keys = list(model.state_dict()) == list(loaded.state_dict())

        meta = get_safetensors_metadata("ns/a", revision=sha1)

        torch.manual_seed(1)
        BertModel(cfg).save_pretrained("tiny")
        sha2 = api.upload_folder(repo_id="ns/a", folder_path="tiny", commit_message="v2").oid
        old = hf_hub_download("ns/a", "model.safetensors", revision=sha1, cache_dir="c2")
        new = hf_hub_download("ns/a", "model.safetensors", cache_dir="c3")
        digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
        result(dict(
            url=str(url), sha1=sha1, sha2=sha2, commits=[commits_before, commits_after],
            mi_sha=mi.sha, mi_rev_sha=mi_rev.sha, head_after=api.model_info("ns/a").sha,
            siblings=sorted(s.rfilename for s in mi.siblings), same=same, same_keys=same_keys,
            n_tensors=len(meta.weight_map), sharded=meta.sharded,
            old_is_v1=digest(old) == digest("v1.safetensors"),
            new_is_v2=digest(new) == digest("tiny/model.safetensors"),
        ))
        """,
    )
    assert out["url"] == f"{hub.url}/ns/a"
    assert out["commits"][1] == out["commits"][0] + 1, "upload_folder must make exactly one commit"
    assert out["mi_sha"] == out["sha1"] == out["mi_rev_sha"]
    assert {"config.json", "model.safetensors"} <= set(out["siblings"])
    assert out["same"] and out["same_keys"]
    assert out["n_tensors"] > 10 and out["sharded"] is False
    assert out["sha2"] != out["sha1"] and out["head_after"] == out["sha2"]
    assert out["old_is_v1"] and out["new_is_v2"]
    gets = _resolve_gets(hub)
    assert f"/ns/a/resolve/{out['sha1']}/model.safetensors" in gets
    assert f"/ns/a/resolve/{out['sha1']}/config.json" in gets


def test_missing_repo_revision_and_file_map_to_client_errors(hub: HubServer, tmp_path: Path) -> None:
    out = run_client(
        hub,
        tmp_path,
        """
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        api.create_repo("ns/b")
        api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="ns/b")

        def kind(**kw):
            try:
                hf_hub_download(**kw)
            except RepositoryNotFoundError:
                return "repo"
            except RevisionNotFoundError:
                return "revision"
            except EntryNotFoundError:
                return "entry"
            return "ok"

        def info_kind(**kw):
            try:
                api.model_info(**kw)
            except RepositoryNotFoundError:
                return "repo"
            except RevisionNotFoundError:
                return "revision"
            return "ok"

        api.create_repo("ns/data", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"x,y\\n1,2\\n", path_in_repo="data/train.csv", repo_id="ns/data",
                        repo_type="dataset")
        csv = open(hf_hub_download("ns/data", "data/train.csv", repo_type="dataset"), "rb").read().decode()
        tree = sorted(f.path for f in api.list_repo_tree("ns/data", repo_type="dataset", recursive=True))
        result(dict(
            ok=kind(repo_id="ns/b", filename="config.json"),
            repo=kind(repo_id="ns/nope", filename="config.json"),
            revision=kind(repo_id="ns/b", filename="config.json", revision="no-such-branch"),
            sha_revision=kind(repo_id="ns/b", filename="config.json", revision="0" * 40),
            entry=kind(repo_id="ns/b", filename="missing.json"),
            info_repo=info_kind(repo_id="ns/nope"),
            info_revision=info_kind(repo_id="ns/b", revision="nope"),
            exists=[api.file_exists("ns/b", "config.json"), api.file_exists("ns/b", "nope.json")],
            whoami=api.whoami()["name"], csv=csv, tree=tree,
        ))
        """,
    )
    assert out["ok"] == "ok"
    assert out["repo"] == "repo" and out["info_repo"] == "repo"
    assert out["revision"] == "revision" and out["sha_revision"] == "revision" and out["info_revision"] == "revision"
    assert out["entry"] == "entry"
    assert out["exists"] == [True, False]
    assert out["whoami"] == "local-user"
    assert out["csv"] == "x,y\n1,2\n"
    assert out["tree"] == ["data", "data/train.csv"]
    assert "/datasets/ns/data/resolve/main/data/train.csv" in _resolve_gets(hub)


def test_stale_parent_rejected_pr_and_branches(hub: HubServer, tmp_path: Path) -> None:
    out = run_client(
        hub,
        tmp_path,
        """
        from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        api.create_repo("ns/c")
        c1 = api.upload_file(path_or_fileobj=b"one", path_in_repo="f.txt", repo_id="ns/c").oid
        c2 = api.upload_file(path_or_fileobj=b"two", path_in_repo="f.txt", repo_id="ns/c").oid
        try:
            api.create_commit("ns/c", [CommitOperationAdd("g.txt", b"stale")], commit_message="stale",
                              parent_commit=c1)
            stale = None
        except HfHubHTTPError as e:
            stale = e.response.status_code
        fresh = api.create_commit("ns/c", [CommitOperationAdd("g.txt", b"fresh")], commit_message="fresh",
                                  parent_commit=c2).oid

        pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="f.txt", repo_id="ns/c",
                             create_pr=True)
        read = lambda path: open(path, "rb").read()
        pr_bytes = read(hf_hub_download("ns/c", "f.txt", revision=pr.pr_revision, cache_dir="c1"))
        main_bytes = read(hf_hub_download("ns/c", "f.txt", cache_dir="c2"))

        dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id="ns/c",
                              revision="dev").oid
        api.create_branch("ns/c", branch="pinned", revision=c1)
        api.create_branch("ns/c", branch="pinned", exist_ok=True)
        refs = api.list_repo_refs("ns/c", include_pull_requests=True)
        api.delete_file("g.txt", "ns/c")
        after_delete = sorted(api.list_repo_files("ns/c"))
        api.delete_repo("ns/c")
        api.delete_repo("ns/c", missing_ok=True)
        result(dict(
            c1=c1, c2=c2, stale=stale, fresh=fresh, pr_revision=pr.pr_revision, pr_num=pr.pr_num,
            pr_bytes=pr_bytes.decode(), main_bytes=main_bytes.decode(), dev=dev,
            branches={b.name: b.target_commit for b in refs.branches},
            prs=[p.ref for p in refs.pull_requests], after_delete=after_delete,
            gone=not api.repo_exists("ns/c"),
        ))
        """,
    )
    assert out["stale"] in (409, 412)
    assert len(out["fresh"]) == 40
    assert out["pr_revision"] == "refs/pr/1" and out["pr_num"] == 1
    assert out["pr_bytes"] == "proposal" and out["main_bytes"] == "two"
    assert out["branches"]["dev"] == out["dev"]
    assert out["branches"]["pinned"] == out["c1"]
    assert out["branches"]["main"] == out["fresh"]
    assert out["prs"] == ["refs/pr/1"]
    assert out["after_delete"] == ["f.txt"]
    assert out["gone"] is True


def test_injected_commit_failure_raises_and_leaves_repo_unchanged(hub: HubServer, tmp_path: Path) -> None:
    hub.fail_next_commits = 1
    out = run_client(
        hub,
        tmp_path,
        """
        import os
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        api.create_repo("ns/d")
        head0 = api.model_info("ns/d").sha
        os.makedirs("folder")
        for i in range(3):
            open(f"folder/w{i}.bin", "wb").write(os.urandom(50_000))
        try:
            api.upload_folder(repo_id="ns/d", folder_path="folder")
            error = None
        except HfHubHTTPError as e:
            error = [type(e).__name__, e.response.status_code]
        head1 = api.model_info("ns/d").sha
        retry = api.upload_folder(repo_id="ns/d", folder_path="folder").oid
        snap = snapshot_download("ns/d", allow_patterns=["w0.bin"], cache_dir="snap")
        result(dict(error=error, unchanged=head0 == head1, retry=retry, head=api.model_info("ns/d").sha,
                    files=sorted(api.list_repo_files("ns/d")), snap=sorted(os.listdir(snap))))
        """,
    )
    assert out["error"] == ["HfHubHTTPError", 500]
    assert out["unchanged"]
    assert out["retry"] == out["head"]
    assert out["files"] == ["w0.bin", "w1.bin", "w2.bin"]
    assert hub.fail_next_commits == 0
    # snapshot_download with allow_patterns fetched only the file it was asked for.
    assert out["snap"] == ["w0.bin"]
    gets = _resolve_gets(hub)
    assert gets == [f"/ns/d/resolve/{out['head']}/w0.bin"], gets


# ------------------------------------------------------------------------------------------- stdlib checks
def _request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None, token: str | None = TOKEN
) -> tuple[int, dict, bytes]:
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _commit(hub: HubServer, repo: str, files: dict[str, bytes], message: str = "add") -> str:
    lines = [{"key": "header", "value": {"summary": message, "description": ""}}]
    lines += [
        {"key": "file", "value": {"path": p, "content": base64.b64encode(d).decode(), "encoding": "base64"}}
        for p, d in files.items()
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, raw = _request(
        f"{hub.url}/api/models/{repo}/commit/main", "POST", body, {"Content-Type": "application/x-ndjson"}
    )
    assert status == 200, raw
    return json.loads(raw)["commitOid"]


def _create(hub: HubServer, namespace: str, name: str) -> None:
    body = json.dumps({"name": name, "organization": namespace, "type": "model"}).encode()
    status, _, raw = _request(f"{hub.url}/api/repos/create", "POST", body, {"Content-Type": "application/json"})
    assert status == 200, raw


def test_resolve_headers_ranges_and_content_addressing(hub: HubServer) -> None:
    data = bytes(range(256)) * 4
    for name in ("r1", "r2"):
        _create(hub, "ns", name)
    sha = _commit(hub, "ns/r1", {"dir/blob.bin": data})
    # Same parent, same files, same message => same commit id, in any repo: commits are content-addressed.
    assert _commit(hub, "ns/r2", {"dir/blob.bin": data}) == sha
    initial = commit_sha(None, {}, "initial commit")
    assert sha == commit_sha(initial, {"dir/blob.bin": hashlib.sha256(data).hexdigest()}, "add")
    assert json.loads(_request(f"{hub.url}/api/models/ns/r1")[2])["sha"] == sha

    url = f"{hub.url}/ns/r1/resolve/{sha}/dir/blob.bin"
    status, headers, body = _request(url, "HEAD")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha and headers["Content-Length"] == str(len(data))
    assert headers["ETag"].strip('"') and headers["Accept-Ranges"] == "bytes"

    assert _request(url, headers={"Range": "bytes=10-19"})[::2] == (206, data[10:20])
    assert _request(url, headers={"Range": "bytes=-5"})[2] == data[-5:]
    assert _request(url, headers={"Range": "bytes=1000-"})[2] == data[1000:]
    status, headers, _ = _request(url, headers={"Range": "bytes=5000-6000"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"

    status, headers, raw = _request(f"{hub.url}/ns/r1/resolve/main/nope.bin", "HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == sha
    status, headers, raw = _request(f"{hub.url}/ns/r1/resolve/nope/dir/blob.bin")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound" and "error" in json.loads(raw)
    assert _request(f"{hub.url}/ns/zz/resolve/main/x")[1]["X-Error-Code"] == "RepoNotFound"

    status, _, raw = _request(f"{hub.url}/api/models/ns/r1/tree/main")
    assert [(e["type"], e["path"]) for e in json.loads(raw)] == [("directory", "dir")]
    status, _, raw = _request(f"{hub.url}/api/models/ns/r1/tree/main/dir")
    assert [e["path"] for e in json.loads(raw)] == ["dir/blob.bin"]

    # The pinned commit keeps serving its bytes after main moves on.
    _commit(hub, "ns/r1", {"dir/blob.bin": b"changed"}, message="change")
    assert _request(url)[2] == data
    assert _request(f"{hub.url}/ns/r1/resolve/main/dir/blob.bin")[2] == b"changed"
    assert ("HEAD", "/ns/r1/resolve/main/nope.bin") in hub.request_log


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "example.com", "::"])
def test_refuses_non_loopback_host(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        HubServer(tmp_path, host=host)


def test_stop_is_prompt_and_idempotent(tmp_path: Path) -> None:
    server = HubServer(tmp_path, host="localhost", token=TOKEN).start()
    assert server.url.startswith("http://127.0.0.1:")
    assert _request(f"{server.url}/api/whoami-v2")[0] == 200
    server.stop()
    server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/api/whoami-v2", timeout=5)


def test_download_log_tells_header_reads_from_downloads_and_409_names_the_repo(hub: HubServer) -> None:
    _create(hub, "ns", "r3")
    data = bytes(range(256)) * 8
    sha = _commit(hub, "ns/r3", {"model.safetensors": data})
    url = f"{hub.url}/ns/r3/resolve/{sha}/model.safetensors"
    _request(url, headers={"Range": "bytes=0-99"})
    _request(url, "HEAD")
    _request(url)
    path = f"/ns/r3/resolve/{sha}/model.safetensors"
    assert hub.download_log[-2:] == [(path, 100), (path, len(data))]  # HEAD sends no body, so it is not logged
    # `create_repo(exist_ok=True)` reads the URL of the existing repo from the 409 answer.
    body = json.dumps({"name": "r3", "organization": "ns", "type": "model"}).encode()
    status, _, raw = _request(f"{hub.url}/api/repos/create", "POST", body=body)
    assert status == 409 and json.loads(raw)["url"] == f"{hub.url}/ns/r3"


# --------------------------------------------------------------------------------------------- hardening
def test_writes_and_private_reads_need_the_token(hub: HubServer) -> None:
    """No token: writes are 401, private (and missing) repos are 401 RepoNotFound; a wrong token is 401."""
    create = json.dumps({"name": "open", "organization": "ns", "type": "model"}).encode()
    status, headers, raw = _request(f"{hub.url}/api/repos/create", "POST", create, token=None)
    assert status == 401 and "token" in json.loads(raw)["error"]
    status, _, raw = _request(f"{hub.url}/api/repos/create", "POST", create, token="wrong")
    assert status == 401 and json.loads(raw)["error"] == "Invalid credentials in Authorization header"
    assert not (hub.root / "repos" / "model" / "ns" / "open").exists()
    _create(hub, "ns", "open")
    line = {"key": "header", "value": {"summary": "sneaky"}}
    commit_url = f"{hub.url}/api/models/ns/open/commit/main"
    assert _request(commit_url, "POST", json.dumps(line).encode(), token=None)[0] == 401
    assert _request(f"{hub.url}/api/models/ns/open/branch/dev", "POST", b"{}", token=None)[0] == 401
    assert len(json.loads(_request(f"{hub.url}/api/models/ns/open/commits/main")[2])) == 1  # nothing applied

    private = json.dumps({"name": "secret", "organization": "ns", "type": "model", "private": True}).encode()
    assert _request(f"{hub.url}/api/repos/create", "POST", private)[0] == 200
    sha = _commit(hub, "ns/secret", {"w.bin": b"weights"})
    for url in (f"{hub.url}/api/models/ns/secret", f"{hub.url}/ns/secret/resolve/{sha}/w.bin"):
        status, headers, raw = _request(url, token=None)
        assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound") and b"weights" not in raw
    # a missing repo looks the same to an anonymous client, so a private repo's existence does not leak
    status, headers, _ = _request(f"{hub.url}/api/models/ns/missing", token=None)
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    assert _request(f"{hub.url}/api/models/ns/missing")[0] == 404
    assert _request(f"{hub.url}/ns/secret/resolve/{sha}/w.bin")[2] == b"weights"
    # public reads and whoami need no token
    assert _request(f"{hub.url}/api/models/ns/open", token=None)[0] == 200
    assert _request(f"{hub.url}/api/whoami-v2", token=None)[0] == 200


def test_real_client_without_or_with_explicit_token(hub: HubServer, tmp_path: Path) -> None:
    """huggingface_hub without HF_TOKEN can read public repos only; `token=` as an argument writes."""
    out = run_client(
        hub,
        tmp_path,
        f"""
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        owner = HfApi(token={TOKEN!r})
        owner.create_repo("ns/pub")
        owner.upload_file(path_or_fileobj=b"public", path_in_repo="f.txt", repo_id="ns/pub")
        owner.create_repo("ns/priv", private=True)
        owner.upload_file(path_or_fileobj=b"private", path_in_repo="f.txt", repo_id="ns/priv")

        anon = HfApi(token=False)
        try:
            anon.create_repo("ns/anon")
            write = None
        except HfHubHTTPError as e:
            write = e.response.status_code
        try:
            anon.model_info("ns/priv")
            private = None
        except RepositoryNotFoundError as e:
            private = e.response.status_code
        public = open(hf_hub_download("ns/pub", "f.txt", token=False, cache_dir="c1"), "rb").read().decode()
        mine = open(hf_hub_download("ns/priv", "f.txt", token={TOKEN!r}, cache_dir="c2"), "rb").read().decode()
        result(dict(write=write, private=private, public=public, mine=mine))
        """,
        token=None,
    )
    assert out == {"write": 401, "private": 401, "public": "public", "mine": "private"}


def _raw(hub: HubServer, headers: dict[str, str], method: str = "GET", path: str = "/api/whoami-v2"):
    """One request with exactly these headers (no Host unless given), over http.client."""
    import http.client

    host, port = hub.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_host_must_be_loopback_and_cross_origin_requests_are_refused(hub: HubServer) -> None:
    """DNS rebinding and CSRF from a web page: foreign Host is 421, foreign Origin 403, no CORS headers."""
    port = hub.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert _raw(hub, {"Host": host})[0] == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{int(port) + 1}", f"192.168.1.2:{port}"):
        assert _raw(hub, {"Host": host})[0] == 421, host
    assert _raw(hub, {})[0] == 400  # no Host at all
    own = f"127.0.0.1:{port}"
    assert _raw(hub, {"Host": own, "Origin": f"http://{own}"})[0] == 200
    answers = [
        _raw(hub, {"Host": own, "Origin": origin}, method)
        for origin in ("http://evil.example", "null", f"http://localhost:{port}", f"https://{own}")
        for method in ("GET", "POST")
    ]
    assert {status for status, _, _ in answers} == {403}
    answers.append(_raw(hub, {"Host": own, "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
                        "OPTIONS"))  # fmt: skip
    assert answers[-1][0] >= 400
    assert not [k for _, headers, _ in answers for k in headers if k.startswith("access-control-")]


class _CLIServer:
    """`otfusion-hub serve-hub --port 0` in a subprocess; the first lines it prints give the URL (and token)."""

    def __init__(self, root: Path, *args: str, env_token: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OTFUSION_HUB_TOKEN"}
        if env_token is not None:
            env["OTFUSION_HUB_TOKEN"] = env_token
        command = [sys.executable, "-m", "hf_otfusion.cli", "serve-hub", "--port", "0", "--root", str(root), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        generated = "--token" not in args and env_token is None  # then a third line prints the token
        self.lines = [self.process.stdout.readline() for _ in range(3 if generated else 2)]
        self.url = self.lines[0].split(" at ")[1].split()[0]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _create_status(url: str, token: str | None) -> int:
    body = json.dumps({"name": "r", "organization": "ns", "type": "model", "private": False}).encode()
    return _request(f"{url}/api/repos/create", "POST", body, token=token)[0]


def test_serve_hub_prints_a_generated_token_or_takes_one(tmp_path: Path) -> None:
    server = _CLIServer(tmp_path / "a")
    try:
        token = server.lines[2].rsplit(": ", 1)[1].strip()
        assert f"HF_TOKEN={token}" in server.lines[1] and len(token) > 20
        assert _create_status(server.url, None) == 401 and _create_status(server.url, token) == 200
    finally:
        server.stop()
    for args, env_token in ((("--token", "given-token"), None), ((), "given-token")):
        server = _CLIServer(tmp_path / "b", *args, env_token=env_token)
        try:
            assert "given-token" not in "".join(server.lines)  # a chosen token is not echoed
            assert _create_status(server.url, "wrong") == 401
            assert _create_status(server.url, "given-token") in (200, 409)
        finally:
            server.stop()


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_a_100_mib_upload_streams_to_disk(tmp_path: Path) -> None:
    """The server's peak RSS grows by far less than the upload: base64 is decoded into the blob as it arrives."""
    import http.client

    size, block = 100 * 2**20, 3 * 2**20  # blocks of 3 MiB: whole base64 quanta, padding only at the end
    pattern = hashlib.sha256(b"seed").digest() * (block // 32)
    server = _CLIServer(tmp_path / "root", "--token", TOKEN)
    try:
        assert _create_status(server.url, TOKEN) == 200
        _commit(server, "ns/r", {"warm-up.bin": b"x" * 1000})  # every code path imported before the baseline
        before = _peak_rss_kib(server.process.pid)

        head = json.dumps({"key": "header", "value": {"summary": "big"}}).encode() + b"\n"
        head += b'{"key": "file", "value": {"content": "'
        tail = b'", "path": "big.bin", "encoding": "base64"}}\n'
        sizes = [min(block, size - start) for start in range(0, size, block)]
        digest = hashlib.sha256()

        def body():
            yield head
            for n in sizes:
                digest.update(pattern[:n])
                yield base64.b64encode(pattern[:n])
            yield tail

        length = len(head) + 4 * -(-size // 3) + len(tail)
        conn = http.client.HTTPConnection(
            server.url.removeprefix("http://").split(":")[0], int(server.url.rsplit(":", 1)[1]), timeout=60
        )
        headers = {"Content-Length": str(length), "Authorization": f"Bearer {TOKEN}"}
        conn.request("POST", "/api/models/ns/r/commit/main", body=body(), headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
        assert resp.status == 200, answer
        growth_mib = (_peak_rss_kib(server.process.pid) - before) / 1024
        print(f"server peak RSS growth during a 100 MiB upload: {growth_mib:.1f} MiB")
        assert growth_mib < 150
        blob = tmp_path / "root" / "blobs" / digest.hexdigest()[:2] / digest.hexdigest()
        assert blob.stat().st_size == size
        status, _, raw = _request(f"{server.url}/ns/r/resolve/main/big.bin", headers={"Range": f"bytes={size - 10}-"})
        assert (status, raw) == (206, pattern[: sizes[-1]][-10:])
        assert not list((tmp_path / "root" / "tmp").iterdir())  # spool and partial blob files are gone
    finally:
        server.stop()


def test_streamed_commit_lines_decode_escapes_and_reject_malformed_ones(hub: HubServer) -> None:
    _create(hub, "ns", "s")
    text = ('line é 😀 "quoted" \\ back\n' * 60_000)[:1_500_000]  # > 1 MiB: spooled to disk as it arrives
    lines = [
        {"key": "header", "value": {"summary": "text", "description": "d\u00e9", "parentCommit": None}},
        {"key": "file", "value": {"path": "t.txt", "content": text, "encoding": "utf-8"}},
        {"key": "file", "value": {"content": base64.b64encode(b"small").decode(), "path": "s.bin"}},
    ]
    url = f"{hub.url}/api/models/ns/s/commit/main"
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)  # ASCII with \\u escapes
    assert _request(url, "POST", body)[0] == 200
    assert _request(f"{hub.url}/ns/s/resolve/main/t.txt")[2] == text.encode()
    assert _request(f"{hub.url}/ns/s/resolve/main/s.bin")[2] == b"small"
    head = json.dumps(lines[0]).encode() + b"\n"
    malformed = [
        b'{"key": "file", "value": {"path": "x", "content": "QQ==QQ=="}}',
        b'{"key": "file", "value": ',
        b'{"key": "file" "value": {}}',
        b'["not", "an", "object"]',
        b'{"key": "header", "value": {"a": tru}}',
    ]
    for bad in malformed:
        status, _, raw = _request(url, "POST", head + bad + b"\n")
        assert status == 400, (bad, raw)
    assert len(json.loads(_request(f"{hub.url}/api/models/ns/s/commits/main")[2])) == 2
    assert not list((hub.root / "tmp").iterdir())


def test_stalled_connections_do_not_create_unbounded_threads(tmp_path: Path) -> None:
    """Connections that never send a request hold at most max_workers threads; the next ones get 503."""
    import socket
    import threading
    import time

    baseline = threading.active_count()
    with HubServer(tmp_path, token=TOKEN, max_workers=3, busy_wait_s=0.3) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        stalled = [socket.create_connection((host, int(port)), timeout=10) for _ in range(8)]
        try:
            peak, deadline = 0, time.monotonic() + 3.5  # 5 refusals x 0.3 s, with slack for a slow machine
            answers: list[bytes] = []
            for sock in stalled[3:]:
                answers.append(sock.recv(200))
                peak = max(peak, threading.active_count() - baseline)
            while time.monotonic() < deadline and peak < 4:
                peak = max(peak, threading.active_count() - baseline)
                time.sleep(0.05)
            assert peak <= 1 + 3, peak  # the accept loop's thread and three workers
            assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
        finally:
            for sock in stalled:
                sock.close()
        # closing the stalled connections frees their workers: the server answers again
        assert _request(f"{server.url}/api/whoami-v2")[0] == 200


def test_a_commit_that_changes_nothing_returns_the_head_without_a_new_commit(hub: HubServer, tmp_path: Path) -> None:
    _create(hub, "ns", "same")
    head = _commit(hub, "ns/same", {"a.bin": b"a", "b.bin": b"b"})
    assert _commit(hub, "ns/same", {"a.bin": b"a"}, message="again") == head
    assert len(json.loads(_request(f"{hub.url}/api/models/ns/same/commits/main")[2])) == 2
    assert _commit(hub, "ns/same", {"a.bin": b"changed"}) != head
    out = run_client(
        hub,
        tmp_path,
        """
        import os
        from huggingface_hub import HfApi

        api = HfApi()
        os.makedirs("folder")
        open("folder/w.bin", "wb").write(b"weights")
        first = api.upload_folder(repo_id="ns/same", folder_path="folder").oid
        second = api.upload_folder(repo_id="ns/same", folder_path="folder").oid
        result(dict(first=first, second=second, commits=len(api.list_repo_commits("ns/same"))))
        """,
    )
    assert out["first"] == out["second"] and out["commits"] == 4


def test_model_info_reads_card_data_pipeline_and_tags_from_the_readme_at_that_revision(
    hub: HubServer, tmp_path: Path
) -> None:
    """Like the Hub, repo info indexes the README's front matter of the revision asked for."""
    out = run_client(
        hub,
        tmp_path,
        """
        from huggingface_hub import HfApi, ModelCardData

        api = HfApi()
        api.create_repo("ns/carded")
        card = (
            "---\\nlicense: mit\\nlibrary_name: transformers\\npipeline_tag: image-classification\\n"
            "tags: [merge, vision]\\nbase_model: [ns/a, ns/b]\\nbase_model_relation: merge\\n"
            "datasets: [ns/images]\\n---\\n# carded\\nSee [the paper](https://arxiv.org/abs/2310.05719).\\n"
        )
        first = api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="ns/carded").oid
        api.upload_file(path_or_fileobj=b"---\\nlicense: apache-2.0\\n---\\n", path_in_repo="README.md",
                        repo_id="ns/carded")
        old, new = api.model_info("ns/carded", revision=first), api.model_info("ns/carded")
        api.create_repo("ns/plain")
        api.upload_file(path_or_fileobj=b"no front matter", path_in_repo="README.md", repo_id="ns/plain")
        api.create_repo("ns/data", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"---\\nlicense: cc-by-4.0\\ntags: [tabular]\\n---\\n",
                        path_in_repo="README.md", repo_id="ns/data", repo_type="dataset")
        plain, data = api.model_info("ns/plain"), api.dataset_info("ns/data")
        result(dict(
            card_type=type(old.card_data).__name__, card=old.card_data.to_dict(), pipeline=old.pipeline_tag,
            library=old.library_name, tags=old.tags, new_license=new.card_data.license, new_tags=new.tags,
            new_pipeline=new.pipeline_tag, plain=[plain.card_data, plain.tags],
            data=[data.card_data.license, data.tags],
        ))
        """,
    )
    assert out["card_type"] == "ModelCardData"
    assert out["card"]["base_model"] == ["ns/a", "ns/b"] and out["card"]["license"] == "mit"
    assert out["pipeline"] == "image-classification" and out["library"] == "transformers"
    assert out["tags"] == [
        "merge", "vision", "transformers", "dataset:ns/images", "base_model:ns/a", "base_model:merge:ns/a",
        "base_model:ns/b", "base_model:merge:ns/b", "arxiv:2310.05719", "license:mit",
    ]  # fmt: skip
    assert out["new_license"] == "apache-2.0" and out["new_tags"] == ["license:apache-2.0"]
    assert out["new_pipeline"] is None  # the newer card has none: nothing is carried over from the old one
    assert out["plain"] == [None, []]
    assert out["data"] == ["cc-by-4.0", ["tabular", "license:cc-by-4.0"]]


def test_dataset_push_to_hub_and_load_dataset_round_trip(hub: HubServer, tmp_path: Path) -> None:
    """`datasets` pushes its parquet shards through LFS (batch + PUT + `lfsFile`) and loads them back."""
    out = run_client(
        hub,
        tmp_path,
        """
        from datasets import Dataset, load_dataset
        from huggingface_hub import HfApi

        rows = {"text": ["a cat", "a dog", "a bird", "a fish"], "label": [0, 1, 2, 1]}
        Dataset.from_dict(rows).push_to_hub("ns/data")
        loaded = load_dataset("ns/data", split="train")
        Dataset.from_dict(rows).push_to_hub("ns/data")  # the same shard again: stored already, not re-sent
        files = {f.path: f.lfs for f in HfApi().list_repo_tree("ns/data", repo_type="dataset", recursive=True)
                 if hasattr(f, "lfs")}
        result(dict(rows=loaded.to_dict(), files={p: lfs and {"size": lfs.size} for p, lfs in files.items()}))
        """,
    )
    assert out["rows"] == {"text": ["a cat", "a dog", "a bird", "a fish"], "label": [0, 1, 2, 1]}
    shard = "data/train-00000-of-00001.parquet"
    assert out["files"][shard]["size"] > 0 and out["files"]["README.md"] is None  # binary shard in LFS, card not
    puts = [path for method, path in hub.request_log if method == "PUT"]
    assert len(puts) == 1 and puts[0].startswith("/api/lfs-upload/")
    assert ("POST", "/datasets/ns/data.git/info/lfs/objects/batch") in hub.request_log


def test_lfs_uploads_need_the_token_a_signed_url_and_the_announced_content(hub: HubServer) -> None:
    """The batch API needs the token; the upload URL is the token's stand-in, bound to one oid and size."""
    _create(hub, "ns", "big")
    data = bytes(range(256)) * 64
    oid = hashlib.sha256(data).hexdigest()
    batch_url = f"{hub.url}/ns/big.git/info/lfs/objects/batch"
    request = json.dumps({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]})
    assert _request(batch_url, "POST", request.encode(), token=None)[0] == 401
    status, _, raw = _request(batch_url, "POST", request.encode())
    assert status == 200, raw
    (answer,) = json.loads(raw)["objects"]
    href = answer["actions"]["upload"]["href"]
    assert href.startswith(f"{hub.url}/api/lfs-upload/{oid}?")

    blob = hub.root / "blobs" / oid[:2] / oid
    other = bytes(reversed(data))
    assert _request(href, "PUT", other, token=None)[0] == 400  # content that is not the announced oid
    assert not blob.exists() and not (hub.root / "blobs" / hashlib.sha256(other).hexdigest()[:2]).exists()
    assert _request(href.replace("signature=", "signature=0"), "PUT", data, token=None)[0] == 403
    assert _request(href.replace(f"size={len(data)}", "size=1"), "PUT", data[:1], token=None)[0] == 403
    signed_long_ago = hub.guard.sign(oid, str(len(data)), "1")
    expired = f"{hub.url}/api/lfs-upload/{oid}?size={len(data)}&expires=1&signature={signed_long_ago}"
    assert _request(expired, "PUT", data, token=None)[0] == 403  # signed, but long ago
    assert not blob.exists()
    assert _request(href, "PUT", data, token=None)[0] == 200
    assert blob.read_bytes() == data
    status, _, raw = _request(batch_url, "POST", request.encode())
    assert "actions" not in json.loads(raw)["objects"][0]  # stored: the client skips the upload

    commit_url = f"{hub.url}/api/models/ns/big/commit/main"
    head = {"key": "header", "value": {"summary": "weights"}}
    for lfs_oid, expected in ((hashlib.sha256(b"never sent").hexdigest(), 422), (oid, 200)):
        line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": lfs_oid, "size": len(data)}}
        body = b"".join(json.dumps(item).encode() + b"\n" for item in (head, line))
        assert _request(commit_url, "POST", body)[0] == expected
    status, headers, raw = _request(f"{hub.url}/ns/big/resolve/main/w.bin")
    assert raw == data and headers["X-Linked-Etag"] == f'"{oid}"' and headers["X-Linked-Size"] == str(len(data))
    (entry,) = json.loads(_request(f"{hub.url}/api/models/ns/big/tree/main")[2])
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
    assert entry["lfs"] == {"oid": oid, "size": len(data), "pointerSize": len(pointer)}


@pytest.mark.parametrize(
    ("path", "content", "size", "mode"),
    [
        ("README.md", b"# a card\n", None, "regular"),
        ("notes.txt", "caf\u00e9 ".encode() * 200, 513, "regular"),  # a sample may cut a character in two
        ("model.safetensors", b'{"__metadata__": {}}', None, "lfs"),  # tracked by suffix, text-looking or not
        ("weights.raw", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", None, "lfs"),  # a NUL byte: binary
        ("latin.txt", b"caf\xe9", None, "lfs"),  # not UTF-8: binary to git
        ("big.json", b"{}", 10 * 2**20 + 1, "lfs"),  # too large to sit in git
        ("empty.bin", b"", None, "regular"),  # the client sends empty files regularly anyway
    ],
)
def test_preupload_sends_binary_large_and_tracked_files_to_lfs(path, content, size, mode) -> None:
    from hf_otfusion.hub.server.lfs import upload_mode

    sample = base64.b64encode(content[:512]).decode()
    assert upload_mode(path, len(content) if size is None else size, sample) == mode


def test_a_connection_slot_is_released_once_when_both_the_thread_and_an_interrupted_start_release_it(tmp_path):
    """Ctrl-C while a worker thread starts made the server release its slot twice (ValueError) and serve on."""
    server = HubServer(tmp_path, token=TOKEN, max_workers=2)
    httpd, request = server._httpd, object()
    try:
        assert httpd._slots.acquire(timeout=0)
        httpd._held.add(id(request))
        httpd._release_slot(request)  # the worker thread's `finally`
        httpd._release_slot(request)  # the interrupted `process_request`: a no-op now
        assert [httpd._slots.acquire(timeout=0) for _ in range(3)] == [True, True, False]  # both slots, no more
    finally:
        server.stop()
