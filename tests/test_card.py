"""The fused model's card: what its metadata inherits from the parents, checked through `huggingface_hub`."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard, ModelCardData

from hf_otfusion.cli import main
from hf_otfusion.hub.parents import resolve_parent
from hf_otfusion.output.card import _quality_text, inherited_license, license_conflict


@pytest.fixture
def parents(saved_parents):
    return saved_parents[1]


def _with_licenses(paths: list[str], licenses: list[str | None]) -> None:
    for path, license in zip(paths, licenses, strict=True):
        front = f"license: {license}\n" if license else "tags: [vision]\n"
        with open(f"{path}/README.md", "w") as f:
            f.write(f"---\n{front}---\n# parent\n")


def test_parents_with_different_licences_warn_and_the_card_says_so(parents, tmp_path, caplog):
    _with_licenses(parents, ["mit", "apache-2.0"])
    out = tmp_path / "fused"
    with caplog.at_level(logging.WARNING, logger="hf_otfusion"):
        assert main(["fuse", *parents, "--out", str(out), "--cost", "weights", "-q"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "licences differ" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{parents[0]}: mit" in warnings[0] and f"{parents[1]}: apache-2.0" in warnings[0]

    card = ModelCard.load(out / "README.md")
    assert isinstance(card.data, ModelCardData)
    metadata = card.data.to_dict()
    assert "license" not in metadata and metadata["base_model_relation"] == "merge"
    assert ModelCardData(**metadata).to_dict() == metadata  # the front matter round-trips through the client
    line = next(line for line in card.text.splitlines() if line.startswith("**Licence:**"))
    assert "mit" in line and "apache-2.0" in line and "compatible" in line


def test_parents_with_one_licence_pass_it_on_without_a_warning(parents, tmp_path, caplog):
    _with_licenses(parents, ["apache-2.0", "apache-2.0"])
    out = tmp_path / "fused"
    with caplog.at_level(logging.WARNING, logger="hf_otfusion"):
        assert main(["fuse", *parents, "--out", str(out), "--cost", "weights", "-q"]) == 0
    assert not [r for r in caplog.records if "licence" in r.getMessage()]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "**Licence:**" not in card.text


@pytest.mark.parametrize(
    ("licenses", "inherited", "conflict"),
    [
        (["mit", "mit"], "mit", False),
        (["mit", "apache-2.0"], None, True),
        (["mit", None], None, True),  # an undeclared licence is unknown terms, not agreement
        ([None, None], None, False),  # nothing known, nothing to compare
        (["mit", "mit", "gpl-3.0"], None, True),
    ],
)
def test_licence_is_inherited_only_when_every_parent_declares_the_same(licenses, inherited, conflict):
    assert inherited_license(licenses) == inherited
    note = license_conflict(licenses)
    assert (note is not None) == conflict
    if conflict:
        assert all(f"parent {k}: {license or 'none declared'}" in note for k, license in enumerate(licenses))


def test_a_licence_named_only_in_the_config_counts(parents):
    config = json.loads(open(f"{parents[0]}/config.json").read())
    with open(f"{parents[0]}/config.json", "w") as f:
        json.dump({**config, "license": "cc-by-4.0"}, f)
    _with_licenses(parents, [None, "mit"])
    assert resolve_parent(parents[0]).license == "cc-by-4.0"
    _with_licenses(parents, ["mit", "mit"])
    assert resolve_parent(parents[0]).license == "mit"  # the card's metadata wins over the config


@pytest.mark.parametrize(("kept", "warned"), [("closed-form", False), ("refined", True)])
def test_the_card_says_which_candidate_best_quality_kept_and_warns_when_the_anchor_did_better(kept, warned):
    losses = {"refined": 0.41, "closed-form": 0.2, "anchor": 0.3}
    choice = {"criterion": "labels", "held_back_loss": losses, "kept": kept, "held_back_samples": 60}
    text = _quality_text(SimpleNamespace(quality={"map_kinds": {}, "repair": [], "refine": None, "choice": choice}))
    other = "refined" if kept == "closed-form" else "closed-form"
    expected = f"{losses[kept]:.4f} against {losses[other]:.4f} (the anchor alone: 0.3000)"
    assert f"kept the {kept} fusion over the {other} one: on 60 held-back alignment samples" in text
    assert "cross-entropy on their labels" in text and expected in text
    assert ("does worse than the anchor alone" in text) == warned
