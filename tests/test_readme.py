"""The README's Python blocks run as written, with tiny stand-ins for their placeholders.

The blocks that talk to the Hub (`user/...` ids) run against the local server in `test_hub_cli.py`.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap

import pytest
from hub_utils import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
# what the README leaves to the reader: numbers of steps that would make a test slow, and where examples live
STAND_INS = {"max_steps=200": "max_steps=2", '"examples/': f'"{REPO_ROOT}/examples/'}


def readme_block(block: str, stand_ins: dict[str, str]) -> str:
    for placeholder, value in stand_ins.items():
        block = block.replace(placeholder, value)
    return block


def test_readme_names_imported_from_hf_otfusion_are_its_functions_and_classes():
    # a fresh interpreter per block: whether a name is shadowed by a submodule depends on import order
    for block in BLOCKS:
        imports = [
            node for node in ast.parse(block).body if isinstance(node, ast.ImportFrom) and node.module == "hf_otfusion"
        ]
        for node in imports:
            names = [alias.name for alias in node.names]
            check = f"""
                import inspect
                from hf_otfusion import {", ".join(names)}
                print([inspect.isclass(value) or inspect.isfunction(value) for value in ({", ".join(names)},)])
                """
            proc = subprocess.run([sys.executable, "-c", textwrap.dedent(check)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.strip() == str([True] * len(names)), f"not all of {names} are functions or classes"


def test_importing_a_submodule_keeps_the_exported_function_of_its_name():
    import hf_otfusion
    import hf_otfusion.train.finetune  # noqa: F401  (a submodule import must not shadow the exported function)
    from hf_otfusion import finetune
    from hf_otfusion.train.finetune import FinetuneConfig

    assert inspect.isfunction(finetune) and hf_otfusion.finetune is finetune
    assert FinetuneConfig is hf_otfusion.FinetuneConfig


@pytest.fixture
def digits():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        from digits_data import load_digits_splits
    finally:
        sys.path.remove(str(REPO_ROOT / "examples"))
    splits = load_digits_splits()
    return splits["train"].select(range(64)), splits["test"].select(range(32))


def _multitask_checkpoints(root) -> None:
    """Tiny stand-ins for the multi-task block: a BERT base and two fine-tunes of it with 3 and 5 labels."""
    import torch
    from conftest import build

    base = build("bert-base", seed=0)
    base.save_pretrained(root / "bert-base")
    for name, labels in (("ft-nli", 3), ("ft-sst", 5)):
        tuned = build("bert-seqcls", seed=labels, num_labels=labels)
        tuned.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in tuned.bert.parameters():
                param.add_(0.01 * torch.randn_like(param))
        tuned.save_pretrained(root / name)


def test_readme_python_blocks_run_with_tiny_stand_ins(digits, tmp_path, monkeypatch):
    train, test = digits
    monkeypatch.chdir(tmp_path)
    _multitask_checkpoints(tmp_path)  # the fine-tunes and base that the multi-task block names
    offline = [block for block in BLOCKS if "user/" not in block]
    assert len(offline) >= 2
    namespace = {"alignment_dataset": train.remove_columns("labels"), "train_dataset": train,
                 "eval_dataset": test, "test_dataset": test}  # fmt: skip
    for block in offline:
        exec(compile(readme_block(block, STAND_INS), "README.md", "exec"), namespace)
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    assert (tmp_path / "fused-ft" / "model.safetensors").is_file()
    assert namespace["result"].steps == 2 and "fused" in str(namespace["table"])
    assert (tmp_path / "merged" / "nli" / "model.safetensors").is_file()  # the multi-task block
