"""What every config dataclass shares: rules for numeric fields, defaults for help texts, strict loading.

`FusionConfig`, `FinetuneConfig` and the `FuseJob` run model each keep one table of `NumberRule`s and load from
dicts with `strict_from_dict`, so a new field is one new row and a typo in a config file fails with the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import InvalidConfigError


@dataclass(frozen=True)
class NumberRule:
    """What a numeric config field accepts: its type, finite values within bounds, and None if `optional`.

    One table of rules per config class, checked in one loop by `check_numbers`, so a new field is one new row.
    """

    kind: type  # int or float; an integer is accepted where a float is asked for, a bool never
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `> low` instead of `>= low`
    optional: bool = False

    def check(self, field: str, value: Any) -> Any:
        """Returns `value` as `kind`; raises `InvalidConfigError` naming `field`, what it accepts and what it got."""
        problem = self.problem(value)
        if problem is not None:
            raise InvalidConfigError(f"{field} {problem}.", field=field.split(".", 1)[-1], value=value)
        return None if value is None else self.kind(value)

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (`"must be >= 1, got -5"`), or None when it is accepted."""
        if value is None and self.optional:
            return None
        accepted = numbers.Integral if self.kind is int else numbers.Real  # numpy scalars too
        if isinstance(value, bool) or not isinstance(value, accepted):
            kind = "an integer" if self.kind is int else "a number"
            return f"must be {kind}{' or None' if self.optional else ''}, got {value!r} ({type(value).__name__})"
        number = float(value)
        if not isinstance(value, numbers.Integral) and not math.isfinite(number):
            return f"must be finite, got {value!r}"
        low_ok = self.low is None or (number > self.low if self.low_open else number >= self.low)
        if not low_ok or (self.high is not None and number > self.high):
            return f"must {self.describe()}, got {value!r}"
        return None

    def describe(self) -> str:
        def text(bound: float | None) -> str:
            if bound is None:
                return "-inf"
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        if self.high is not None:
            return f"lie in {'(' if self.low_open else '['}{text(self.low)}, {text(self.high)}]"
        return f"be {'>' if self.low_open else '>='} {text(self.low)}"


def check_numbers(config: Any, rules: dict[str, NumberRule]) -> None:
    """Checks (and normalises to their type) the numeric fields of `config` listed in `rules`."""
    for name, rule in rules.items():
        setattr(config, name, rule.check(f"{type(config).__name__}.{name}", getattr(config, name)))


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value, calling its factory (for help texts and command lines)."""
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def strict_from_dict(cls, values: dict[str, Any]):
    """`cls(**values)` for a config dataclass, rejecting unknown keys so that typos do not pass silently."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidConfigError(
            f"Unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(known)}.",
            field=unknown,
            value={key: values[key] for key in unknown},
        )
    return cls(**values)
