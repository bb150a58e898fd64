"""Parents from the Hub or disk: pinned to a commit, read from config and weight headers, then downloaded and loaded.

The order matters for users with large parents on slow links: every revision is first pinned to its commit SHA,
then only `config.json` and the safetensors headers are read (`HfApi.get_safetensors_metadata` uses a Range
request), and the parents are checked against the alignment spec on meta-device models built from those
configs. Only when all of that passes are the weights downloaded, pinned to the SHAs, so the fused checkpoint can
be rebuilt bit for bit from what the model card records.

Safety: weights load from safetensors only (pickle `.bin` files run code when loaded, refused unless
`allow_pickle`), and `trust_remote_code` is never passed unless the caller asked for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from ..checkpoints import Checkpoint
from ..data import is_repo_id
from ..errors import (
    CorruptCheckpointError,
    ParentNotFoundError,
    UnknownRevisionError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)

logger = logging.getLogger(__name__)

SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
#: Files that make up a tokenizer or image processor; the anchor's are copied next to the fused weights.
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json", "chat_template.jinja",
)  # fmt: skip


@dataclass
class WeightFile:
    """One weight file of a parent: its name in the repo, its size, and (once downloaded) its sha256."""

    name: str
    size: int
    sha256: str | None = None


@dataclass
class Parent:
    """A parent checkpoint, resolved: where it lives, the exact commit, its config and weight files.

    Attributes:
        source: the string given by the user (`user/model@rev` or a directory).
        repo_id / revision / commit: for Hub parents: the repo, the requested revision (`None` = default
            branch) and the commit SHA it resolved to.
        path: for local parents: the directory.
        config: the parsed `config.json`.
        weight_format: `safetensors` or `pickle` (only with `allow_pickle`).
        weight_files: the weight files to load (shards listed by an index file are listed themselves).
        processor_files: tokenizer / image-processor files present in the checkpoint.
        num_parameters: tensor elements counted from the safetensors headers (`None` for pickle weights).
        tensors: every tensor's name and shape, from the safetensors headers (empty for pickle weights).
        license: the `license` of the parent's model card (or, without one, a `license` key in its config).
        directory: where the files are on disk: the local directory, or the download snapshot once fetched.
    """

    source: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    weight_format: str = "safetensors"
    weight_files: list[WeightFile] = field(default_factory=list)
    processor_files: list[str] = field(default_factory=list)
    num_parameters: int | None = None
    license: str | None = None
    directory: Path | None = None
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def on_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def pinned(self) -> str:
        """How to name exactly this checkpoint again: `repo@sha` for Hub parents, the directory otherwise."""
        return f"{self.repo_id}@{self.commit}" if self.on_hub else str(self.path)

    @property
    def name(self) -> str:
        return self.repo_id if self.on_hub else str(self.path)

    def to_dict(self) -> dict[str, Any]:
        """The provenance record: identity, commit and per-file sha256 (not the config, which the card summarises)."""
        record = asdict(self)
        record.pop("config")
        record.pop("directory")
        record.pop("tensors")
        record["path"] = str(self.path) if self.path else None
        record["architecture"] = (self.config.get("architectures") or [None])[0]
        record["model_type"] = self.config.get("model_type")
        return record


# --------------------------------------------------------------------------------------------- resolution
def resolve_parent(source: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Parent:
    """Pins a parent (`user/model[@revision]` or a local directory) and reads its config and weight headers.

    Nothing but `config.json` and the first bytes of each safetensors file (its header) is fetched.

    Raises:
        ParentNotFoundError: no such local directory or Hub repository.
        UnknownRevisionError: the repository has no such branch, tag or commit.
        UnsafeCheckpointError: only pickle weights (without `allow_pickle`), or remote code (without
            `trust_remote_code`).
        CorruptCheckpointError: no config.json, no weights, or an unreadable / truncated safetensors header.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        parent = _resolve_local(source, path, allow_pickle)
    else:
        repo_id, _, revision = source.partition("@")
        if path.exists() or not is_repo_id(repo_id) or source.startswith((".", "/", "~")):
            raise ParentNotFoundError(
                f"Parent {source!r} is not a checkpoint directory and not a Hub model id (`user/model` or "
                "`user/model@revision`); check the path or the id.",
                source=source,
            )
        parent = _resolve_hub(source, repo_id, revision or None, allow_pickle)
    if parent.license is None and isinstance(parent.config.get("license"), str):
        parent.license = parent.config["license"]  # a few configs name it; the card's metadata wins
    _check_remote_code(parent, trust_remote_code)
    return parent


def _resolve_local(source: str, path: Path, allow_pickle: bool) -> Parent:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CorruptCheckpointError(
            f"Parent {source!r} has no config.json; point to a directory written by save_pretrained.",
            path=config_path,
            source=source,
        )
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    parent = Parent(source=source, path=path.resolve(), config=_read_json(config_path, source))
    parent.weight_format, names = _weight_names(
        source, files, allow_pickle, lambda name: _read_json(path / name, source)
    )
    parent.weight_files = [WeightFile(name, (path / name).stat().st_size) for name in names]
    parent.processor_files = [name for name in files if name in PROCESSOR_FILES]
    if parent.weight_format == "safetensors":
        for name in names:
            parent.tensors.update(_verify_safetensors(path / name, source))
        parent.num_parameters = _count(parent.tensors)
    parent.directory = parent.path
    parent.license = _card_license(path / "README.md")
    return parent


def _resolve_hub(source: str, repo_id: str, revision: str | None, allow_pickle: bool) -> Parent:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError as error:
        raise UnknownRevisionError(
            f"Parent {repo_id} has no revision {revision!r}; give an existing branch, tag or commit SHA after '@'.",
            source=repo_id,
            revision=revision,
        ) from error
    except RepositoryNotFoundError as error:
        raise ParentNotFoundError(
            f"Parent {source!r}: no local directory of that name, and the Hub has no model repository {repo_id!r} "
            "(or it is private or gated: log in with `hf auth login` or set HF_TOKEN).",
            source=source,
        ) from error
    except OfflineModeIsEnabled as error:
        raise ParentNotFoundError(
            f"Parent {source!r} is a Hub id but Hub access is disabled (HF_HUB_OFFLINE); unset it or use a local "
            "directory.",
            source=source,
        ) from error
    commit = info.sha
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    parent = Parent(source=source, repo_id=repo_id, revision=revision, commit=commit)
    try:
        config_path = hf_hub_download(repo_id, "config.json", revision=commit)
    except EntryNotFoundError as error:
        raise CorruptCheckpointError(
            f"Parent {repo_id}@{commit[:8]} has no config.json; it is not a transformers checkpoint.",
            path="config.json",
            source=source,
        ) from error
    parent.config = _read_json(Path(config_path), source)

    def read_index(name: str) -> dict:
        return _read_json(Path(hf_hub_download(repo_id, name, revision=commit)), source)

    parent.weight_format, names = _weight_names(source, sorted(sizes), allow_pickle, read_index)
    parent.weight_files = [WeightFile(name, int(sizes.get(name) or 0)) for name in names]
    parent.processor_files = [name for name in sorted(sizes) if name in PROCESSOR_FILES]
    if "README.md" in sizes:
        parent.license = _card_license(Path(hf_hub_download(repo_id, "README.md", revision=commit)))
    if parent.weight_format == "safetensors":
        try:
            metadata = api.get_safetensors_metadata(repo_id, revision=commit)
        except (SafetensorsParsingError, NotASafetensorsRepoError) as error:
            raise CorruptCheckpointError(
                f"Parent {repo_id}@{commit[:8]}: cannot read the safetensors header(s): {error}. The file is corrupt "
                "or not safetensors; re-upload it (save_pretrained writes valid files).",
                source=source,
            ) from error
        for weight in parent.weight_files:
            if weight.name.endswith(".json"):
                continue  # the shard index; its shards are listed themselves
            header = metadata.files_metadata.get(weight.name)
            if header is None:
                raise CorruptCheckpointError(
                    f"Parent {parent.pinned}: no safetensors header for {weight.name}.", path=weight.name, source=source
                )
            data_end = max((t.data_offsets[1] for t in header.tensors.values()), default=0)
            if weight.size:  # exactly 8 + header + data, or the download would be refused
                expected = 8 + _hub_header_length(api, repo_id, weight.name, commit) + data_end
                if weight.size != expected:
                    how = "truncated" if weight.size < expected else "longer than its header describes"
                    raise CorruptCheckpointError(
                        f"Parent {parent.pinned}: {weight.name} is {weight.size:,} bytes but its header describes "
                        f"{expected:,} bytes; the file is {how}. Re-upload it (re-export it with save_pretrained).",
                        path=weight.name,
                        source=source,
                    )
            parent.tensors.update({name: tuple(t.shape) for name, t in header.tensors.items()})
        parent.num_parameters = _count(parent.tensors)
    return parent


def _hub_header_length(api, repo_id: str, name: str, commit: str) -> int:
    """N, the header length a Hub safetensors file starts with: its first 8 bytes, one Range request."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, name, revision=commit, endpoint=api.endpoint)
    response = get_session().get(
        url,
        headers={**build_hf_headers(), "range": "bytes=0-7"},
        timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
    )
    hf_raise_for_status(response)
    return int.from_bytes(response.content[:8], "little")


def _count(tensors: dict[str, tuple[int, ...]]) -> int:
    return sum(int(torch.Size(shape).numel()) for shape in tensors.values())


def _weight_names(source: str, files: list[str], allow_pickle: bool, read_index) -> tuple[str, list[str]]:
    """The weight format and the weight files to fetch (an index file plus its shards, or one file)."""
    for fmt, single, index in (
        ("safetensors", SAFETENSORS_FILE, SAFETENSORS_INDEX),
        ("pickle", PICKLE_FILE, PICKLE_INDEX),
    ):
        if index in files:
            names = [index, *sorted(set(read_index(index).get("weight_map", {}).values()))]
        elif single in files:
            names = [single]
        else:
            continue
        if fmt == "pickle" and not allow_pickle:
            raise UnsafeCheckpointError(
                f"Parent {source!r} has only pickle weights ({names[0]}); unpickling can run arbitrary code. Convert "
                "it to safetensors (load it and save_pretrained it), or pass --allow-pickle (allow_pickle=True) if "
                "you trust its author.",
                path=names[0],
                reason="pickle",
            )
        missing = [name for name in names if name not in files]
        if missing:
            raise CorruptCheckpointError(
                f"Parent {source!r}: {index} lists shard(s) {missing} that are not there.", path=index, source=source
            )
        return fmt, names
    raise CorruptCheckpointError(
        f"Parent {source!r} has no {SAFETENSORS_FILE} (nor a sharded {SAFETENSORS_INDEX}); files: {files[:20]}.",
        source=source,
    )


def _verify_safetensors(path: Path, source: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a local safetensors file, once its length and header are checked.

    A safetensors file is 8 bytes (little-endian u64 header length N), N bytes of JSON header, then the tensor
    data; its length must be exactly 8 + N + the largest end offset in the header. A file cut short (or with bytes
    appended) in transit is refused here, naming both lengths, before safetensors itself opens it.
    """
    from safetensors import SafetensorError, safe_open

    if path.suffix == ".json":
        return {}
    actual = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        raw = handle.read(length) if length is not None and length <= actual else b""
    try:
        header = json.loads(raw) if length is not None and len(raw) == length else None
    except ValueError:
        header = None
    if isinstance(header, dict):
        ends = [
            t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
        ]
        expected = 8 + length + max([int(e) for e in ends if isinstance(e, int)], default=0)
        if actual != expected:
            how = "truncated" if actual < expected else f"{actual - expected} bytes longer than its header describes"
            raise CorruptCheckpointError(
                f"Parent {source!r}: {path.name} is {actual:,} bytes but its header describes {expected:,} bytes "
                f"(8 + {length:,} header + tensor data); the file is {how}. Re-download it, or re-export it with "
                "save_pretrained.",
                path=path,
                source=source,
            )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except SafetensorError as error:
        raise CorruptCheckpointError(
            f"Parent {source!r}: {path.name} is not a valid safetensors file ({error}); it is corrupt or truncated, "
            "write it again with save_pretrained or re-download it.",
            path=path,
            source=source,
        ) from error


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"Parent {source!r}: cannot read {path.name}: {error}", path=path, source=source
        ) from error


def _card_license(readme: Path) -> str | None:
    """The `license` in a model card's front matter (an unreadable card just means "unknown")."""
    import yaml
    from huggingface_hub import metadata_load

    try:
        license = (metadata_load(readme) or {}).get("license") if readme.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return str(license) if license else None


def _check_remote_code(parent: Parent, trust_remote_code: bool) -> None:
    architecture = (parent.config.get("architectures") or [None])[0]
    if parent.config.get("auto_map") and not hasattr(transformers, str(architecture)) and not trust_remote_code:
        raise UnsafeCheckpointError(
            f"Parent {parent.name} needs remote code ({architecture} is defined in the repository, not in "
            "transformers); running it executes that code. Pass --trust-remote-code (trust_remote_code=True) only "
            "if you have read it.",
            path=parent.name,
            reason="remote-code",
        )


def model_class_of(parent: Parent, trust_remote_code: bool) -> type[PreTrainedModel]:
    architecture = (parent.config.get("architectures") or [None])[0]
    model_class = getattr(transformers, str(architecture), None)
    if model_class is None and trust_remote_code:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        auto_map = parent.config.get("auto_map") or {}
        reference = next((v for v in auto_map.values() if str(v).endswith(f".{architecture}")), None)
        if reference is not None:
            model_class = get_class_from_dynamic_module(
                reference, parent.repo_id or str(parent.path), revision=parent.commit
            )
    if model_class is None:
        raise UnsupportedArchitectureError(
            f"Parent {parent.name} names architecture {architecture!r} in its config.json, which transformers does "
            "not provide; pass --trust-remote-code if it is code in the parent's repository that you have read.",
            model_type=parent.config.get("model_type"),
            architecture=architecture,
        )
    return model_class


# ----------------------------------------------------------------------------------------- download + load
def download_parents(parents: list[Parent], anchor: int, *, progress: bool = True) -> None:
    """Fetches each Hub parent's config and weights (and the anchor's processor files) pinned to its commit.

    Records the sha256 of every weight file, local parents included, so the card names the exact bytes fused.
    """
    from huggingface_hub import snapshot_download

    for k, parent in enumerate(parents):
        if parent.on_hub:
            patterns = ["config.json", *(w.name for w in parent.weight_files)]
            if k == anchor:
                patterns += parent.processor_files
            parent.directory = Path(
                snapshot_download(parent.repo_id, revision=parent.commit, allow_patterns=patterns)
            )  # huggingface_hub shows its own progress bars unless they are disabled
        for weight in parent.weight_files:
            path = parent.directory / weight.name
            if parent.on_hub and parent.weight_format == "safetensors":
                _verify_safetensors(path, parent.pinned)  # a file cut short on the server or in transit
            weight.sha256 = sha256_file(path)
            weight.size = path.stat().st_size


def load_parent_model(parent: Parent, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """Loads a downloaded parent as its saved class, failing if any weight is missing or has the wrong shape."""
    return parent_checkpoint(parent, trust_remote_code=trust_remote_code).load()


def parent_checkpoint(parent: Parent, *, trust_remote_code: bool = False) -> Checkpoint:
    """A downloaded parent as a `Checkpoint` that `fuse` loads when its turn comes (see `checkpoints`)."""
    return Checkpoint(
        str(parent.directory), model_class=model_class_of(parent, trust_remote_code), name=parent.pinned,
        use_safetensors=parent.weight_format == "safetensors", trust_remote_code=trust_remote_code,
    )  # fmt: skip


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
