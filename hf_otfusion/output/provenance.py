"""`fusion_provenance.json`: everything needed to rebuild a fused checkpoint exactly, and to trust it.

It records the parents pinned to commit SHAs with the sha256 of every weight file, the full `FusionConfig`, the
alignment and evaluation data (id, commit, split, rows, seed), the evaluation table, the per-space alignment
diagnostics, the command that ran and the one that reproduces it, and the package versions. The model card is
rendered from this record (`hf_otfusion.output.card`), so the two never disagree.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "fusion_provenance.json"
CONFIG_FILE = "fusion_config.yaml"
JOB_FILE = "fusion_job.yaml"
#: Distributions whose versions shape the result (numerics, file format, loading) and are worth recording.
VERSIONED_PACKAGES = (
    "hf-otfusion", "torch", "transformers", "huggingface-hub", "safetensors", "pot", "numpy", "scipy", "datasets",
    "accelerate",
)  # fmt: skip


@dataclass
class Provenance:
    """The record behind a fused checkpoint; `to_json`/`from_json` round-trip it.

    Attributes:
        parents: one `hub.parents.Parent.to_dict()` per parent (source, repo, revision, commit, weight files + sha256).
        anchor: index of the parent whose config and basis the fused model has.
        architecture / model_type: of the fused model.
        config: `FusionConfig.to_dict()`.
        base: the pinned shared ancestor for task arithmetic, as a parent record, or `None`.
        alignment_data / eval_data: `data.DataSource.to_dict()` or `None`.
        evaluation: an evaluation table (`{"split", "rows": [{"name", "accuracy", "loss", ...}]}`) or `None`.
        diagnostics: one dict per solved space and parent (`engine.maps.SpaceDiagnostics.to_dict()`).
        quality: what the quality steps did: `map_kinds` (space kind -> the kinds of map it got), `repair` (one
            dict per repaired site), `refine` (`engine.refine.RefineReport.to_dict()`) and `choice` (which candidate
            `quality="best"` kept, `engine.held_back.QualityChoice.to_dict()`), `refit` (one dict per linear layer
            refitted on the fused model's inputs, `methods.fused_inputs.LayerRefit.to_dict()`), or `None`.
        readiness: the merge-readiness report of the parents (`methods.readiness.ReadinessReport.to_dict()`) or `None`.
        timings: seconds per stage.
        outputs: sha256 of each weight file written.
        command: the command line as run; reproduce: the same fusion pinned to commit SHAs, as flags.
        job: the whole run (`job.FuseJob.to_dict()`), pinned: what `fusion_job.yaml` holds.
        options: output options that change the written bytes (`dtype`, `max_shard_size`).
        versions: package versions; created: UTC time of writing.
    """

    parents: list[dict[str, Any]]
    anchor: int
    architecture: str
    model_type: str
    config: dict[str, Any]
    base: dict[str, Any] | None = None
    alignment_data: dict[str, Any] | None = None
    eval_data: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    readiness: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    command: str = ""
    reproduce: str = ""
    job: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Provenance:
        return cls(**json.loads(text))

    @classmethod
    def load(cls, directory: str | Path) -> Provenance:
        """Reads `fusion_provenance.json` from a fused model directory."""
        return cls.from_json((Path(directory) / PROVENANCE_FILE).read_text())

    def save(self, directory: str | Path) -> None:
        (Path(directory) / PROVENANCE_FILE).write_text(self.to_json())


def weight_hashes(directory: str | Path) -> dict[str, str]:
    """The sha256 of each weight file written in `directory` (a provenance's `outputs`): `model.safetensors`, its
    shards (`model-00001-of-00003.safetensors`) and their index."""
    from ..hub.parents import sha256_file

    files = sorted(p for p in Path(directory).iterdir() if p.name.startswith("model"))
    return {p.name: sha256_file(p) for p in files if p.name.endswith((".safetensors", ".safetensors.index.json"))}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a fusion, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
