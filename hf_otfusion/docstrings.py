"""Per-field documentation read from a config dataclass's Google-style `Args:` section.

The config classes document their fields once, in their docstrings (what `help(FusionConfig)` and an IDE show);
the CLI builds each flag's help from the same text, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import re

# `name: text`, or several fields sharing one entry: `sinkhorn_max_iter / emd_max_iter: text`
_ENTRY = re.compile(r"^(?P<names>\w+(?:\s*/\s*\w+)*):\s+(?P<text>.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """`{field name: description}` from the `Args:` section of `cls.__doc__`, each description joined on one line.

    An entry starts at the section's first indentation; deeper lines continue it. The section ends at the next
    unindented line (`Returns:`, ...). A class without an `Args:` section gives `{}`.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Args:" not in lines:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    entry_indent = None
    for line in lines[lines.index("Args:") + 1 :]:
        text = line.strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = _ENTRY.match(text) if indent == entry_indent else None
        if match:
            names = [name.strip() for name in match["names"].split("/")]
            docs.update({name: match["text"] for name in names})
        else:
            docs.update({name: f"{docs[name]} {text}" for name in names})
    return docs
