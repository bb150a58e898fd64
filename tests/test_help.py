"""`--help` teaches: every flag has help, and the config flags' help is the config classes' own field documentation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hf_otfusion.cli import build_parser
from hf_otfusion.config import FusionConfig
from hf_otfusion.docstrings import field_docs
from hf_otfusion.train.config import FinetuneConfig


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"otfusion-hub": parser, **action.choices}


@pytest.mark.parametrize("config", [FusionConfig, FinetuneConfig])
def test_every_config_field_is_documented_once_in_its_args_section(config):
    # a field without an entry would reach the CLI without help; an entry without a field is a stale doc
    assert sorted(field_docs(config)) == sorted(f.name for f in dataclasses.fields(config))
    assert all(len(text) > 10 for text in field_docs(config).values())


def test_every_subcommand_and_flag_has_help_longer_than_its_name():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in commands._choices_actions:
        assert len(choice.help or "") > len(choice.dest), choice.dest
    for name, command in subcommands().items():
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:  # the second spelling of the top-level --debug
                assert action.option_strings == ["--debug"] and name != "otfusion-hub"
                continue
            label = max(action.option_strings or [action.dest], key=len)
            assert len(action.help or "") > len(label), f"{name} {label} has no help"


def test_config_flags_show_the_field_docs_allowed_values_and_default():
    commands = subcommands()
    fuse, finetune = commands["fuse"].format_help(), commands["finetune"].format_help()
    for config, text in ((FusionConfig, fuse), (FinetuneConfig, finetune)):
        for field in dataclasses.fields(config):
            assert "--" + field.name.replace("_", "-") in text
    flat = " ".join(fuse.split())
    assert "--solver {exact,sinkhorn} `exact` gives hard permutations" in flat
    assert "(default: 0.1; must be > 0)" in flat  # --reg
    assert "(default: activations with --data, else weights)" in flat  # --cost
    epochs = next(a for a in commands["finetune"]._actions if "--num-train-epochs" in a.option_strings)
    assert "only used with `max_steps=-1` (`--max-steps -1`)" in epochs.help
    inspect_solver = next(a for a in commands["inspect"]._actions if "--solver" in a.option_strings)
    assert inspect_solver.help.startswith(field_docs(FusionConfig)["solver"])


def test_field_docs_reads_shared_entries_and_continuation_lines():
    class Example:
        """Summary line.

        Args:
            alpha: first line
                continued here.
            low / high: one entry for two fields.

        Returns:
            nothing that is a field.
        """

    assert field_docs(Example) == {
        "alpha": "first line continued here.",
        "low": "one entry for two fields.",
        "high": "one entry for two fields.",
    }
