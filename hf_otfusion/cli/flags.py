"""Flag builders shared by the `otfusion-hub` commands: config fields as flags, counts, data and push options.

Every option that shapes a run is a field of a config dataclass (`FusionConfig`, `FinetuneConfig`); its flag is
generated here with the field's docstring entry as help, so a command line, `--help` and the saved config file
describe the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors end, like every other error, in one `error: ...` line (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def count(low: int, high: int | None = None):
    """An argparse `type` for an integer flag in `[low, high]`, so a bad value fails as the flag's usage error."""

    from ..config_fields import NumberRule

    rule = NumberRule(int, low, high)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        problem = rule.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer"  # what argparse calls the type in its messages
    return parse


SEED = count(0, 2**32 - 1)


def config_help(cls: type, name: str, shown_default: str | None = None, rules: dict | None = None) -> str:
    """The help of the flag for field `name` of dataclass `cls`: its docstring entry, default and range.

    The text comes from the class's `Args:` section (see `hf_otfusion.docstrings`), so the CLI says what the
    API documentation says. A default of None or False is left out: the entry says what leaving it out means.
    """
    from ..config_fields import field_default
    from ..docstrings import field_docs

    text = field_docs(cls)[name]
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = shown_default if shown_default is not None else field_default(field)
    rule = (rules if rules is not None else cls.number_rules).get(name)
    bounds = f"; must {rule.describe()}" if rule is not None and rule.low is not None else ""
    if default is None or default is False or default is dataclasses.MISSING:
        return (f"{text} (must {rule.describe()})" if bounds else text).replace("%", "%%")
    return f"{text} (default: {default}{bounds})".replace("%", "%%")  # argparse formats help with %


def add_config_flags(group, cls: type, shown_defaults: dict[str, str] | None = None, only=None) -> None:
    """One flag per field of the config dataclass `cls` (`--reg` for `reg`), with `config_help` text.

    Every flag defaults to None, so that only the flags given override a `--config` file. The kind of value
    comes from the field's type annotation. `only`: the names of the fields to add (default: all).
    """
    from ..config import _CHOICES

    for field, kind in _typed_fields(cls):
        if only is not None and field.name not in only:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = config_help(cls, field.name, (shown_defaults or {}).get(field.name))
        if field.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[field.name], default=None, help=help_text)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.name == "weights":
            group.add_argument(flag, type=float, nargs="+", default=None, metavar="W", help=help_text)
        elif field.name == "target":
            group.add_argument(flag, metavar="KEY=INT,...", default=None, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=None, help=help_text)


def config_values(args: argparse.Namespace, cls: type, values: dict | None = None) -> dict:
    """`values` (e.g. a `--config` file's) with every field of `cls` that a flag of `add_config_flags` gave.

    Those flags default to None, so a flag left out keeps the file's value.
    """
    values = dict(values or {})
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)  # None also for a field the command has no flag for (`only=`)
        if given is not None:
            values[field.name] = given
    return values


def add_job_flags(parser: argparse.ArgumentParser, cls: type, rules: dict, choices: dict) -> None:
    """The flags of a run's typed model (`FuseJob`): one per field, grouped by the field's `group` metadata.

    A `list[str]` field without a `group` is the positional argument (`parents`), one with a group a flag taking
    one or more values (`--task-names a b`); a `bool` field is a switch (`--overwrite`); an `int` field
    checks its `rules` entry as the flag's usage error. Fields with `flag: False` metadata, and a nested config
    (flagged by `add_config_flags`), are left out. Every flag defaults to None, so that only the flags given
    override a `--config` job file.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field, kind in _typed_fields(cls):
        if not field.metadata.get("flag", True) or dataclasses.is_dataclass(kind):
            continue
        help_text = config_help(cls, field.name, rules=rules)
        name = field.metadata.get("group")
        if kind is list and name is None:
            parser.add_argument(field.name, nargs="*", default=None, help=help_text)
            continue
        target = parser if name is None else groups.setdefault(name, parser.add_argument_group(name))
        flag = "--" + field.name.replace("_", "-")
        if kind is list:
            target.add_argument(flag, nargs="+", default=None, metavar=field.metadata.get("metavar"), help=help_text)
        elif kind is bool:
            target.add_argument(flag, action="store_true", default=None, help=help_text)
        elif field.name in choices:
            target.add_argument(flag, choices=choices[field.name], default=None, help=help_text)
        else:
            rule = rules.get(field.name)
            parse = count(int(rule.low), None if rule.high is None else int(rule.high)) if rule else kind
            metavar = field.metadata.get("metavar")
            target.add_argument(flag, type=parse, default=None, metavar=metavar, help=help_text)


def _typed_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """Each field of dataclass `cls` with the kind of value its annotation names (`int | None` -> int).

    The annotations are strings (`from __future__ import annotations`), so they are resolved with
    `typing.get_type_hints`; a container gives its origin (`list[str]` -> list).
    """
    hints = typing.get_type_hints(cls)
    typed = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
            hint = options[0]
        typed.append((field, typing.get_origin(hint) or hint))
    return typed


def add_push_options(group, prefix: str) -> None:
    group.add_argument(f"--{prefix}private", action="store_true", help="create the repository as private")
    group.add_argument(f"--{prefix}revision", metavar="BRANCH", help="push to this branch (created if missing)")
    group.add_argument(f"--{prefix}create-pr", action="store_true", help="open a pull request instead of "
                       "committing to the branch")  # fmt: skip


def add_data_options(group, default_split: str, per_task: bool = False) -> None:
    """Where the rows come from and how raw rows become model inputs (shared by `finetune` and `eval`); with
    `per_task`, `--data` takes one source per task of a multi-task output (`eval MERGED --data D1 D2 ...`)."""
    where = ("a Hub dataset id[@revision], a save_to_disk directory, a data directory (imagefolder, csv, ...) or "
             "data files")  # fmt: skip
    if per_task:
        group.add_argument("--data", nargs="+", required=True, metavar="DATA",
                           help=f"{where}; for a multi-task output, one per task, in the task order")  # fmt: skip
    else:
        group.add_argument("--data", required=True, help=where)
    group.add_argument("--split", help=f"split of --data (default: the only split, or {default_split})")
    group.add_argument("--num-samples", type=count(1), help="use this many rows of the split (seeded by --data-seed)")
    group.add_argument("--data-seed", type=SEED, default=0, help="seed of the row sample drawn with --num-samples")
    add_encoding_options(group)


def add_encoding_options(group) -> None:
    """How raw rows become model inputs with the model's tokenizer or image processor (every `--data`)."""
    group.add_argument("--text-column", help="column holding the text (default: detected)")
    group.add_argument("--image-column", help="column holding the images (default: detected)")
    group.add_argument("--label-column", help="column holding the labels (default: label/labels)")
    group.add_argument("--max-length", type=count(1), default=128, help="tokenizer truncation/padding length")


def encode_rows(args, data_source, label2id, processor):
    """The rows of a resolved `DataSource` as model inputs, encoded with the `--text-column`... options."""
    from ..data import encode_dataset

    return encode_dataset(
        data_source.load(), processor, text_column=args.text_column, image_column=args.image_column,
        label_column=args.label_column, max_length=args.max_length, label2id=label2id,
    )  # fmt: skip
