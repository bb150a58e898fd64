"""`FinetuneConfig`: the training recipe of `finetune`, serialisable so the finetuned checkpoint records it.

Kept apart from `finetune` (which imports torch and transformers) so that the CLI builds its flags without them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config_fields import NumberRule, check_numbers, strict_from_dict
from ..errors import InvalidConfigError


@dataclass
class FinetuneConfig:
    """The training recipe: the `TrainingArguments` that matter for a short finetune, with their defaults.

    Args:
        max_steps: number of optimiser steps; `-1` trains for `num_train_epochs` instead.
        num_train_epochs: number of epochs; only used with `max_steps=-1` (`--max-steps -1`), which it replaces
            as the length of training.
        learning_rate: peak learning rate (AdamW).
        batch_size: examples per step and process (the global batch is this times the number of processes).
        eval_batch_size: examples per evaluation batch and process.
        weight_decay: AdamW weight decay.
        warmup: linear warmup, in steps (>= 1) or as a fraction of all steps (< 1).
        lr_scheduler_type: any `transformers` scheduler name (`linear`, `cosine`, `constant`, ...).
        max_grad_norm: gradient clipping norm.
        seed: seed of data order, dropout and any freshly initialised weights.
        logging_steps: steps between two training-loss log entries.
        evaluate_before: also evaluate before training, so the card shows what finetuning changed.
        distill_alpha: weight of distillation from teachers (`finetune(..., teachers=...)`, `--teachers`, e.g. a
            fusion's parents): the loss is (1 - alpha) x cross-entropy + alpha x T² x KL(teachers' mean softmax at
            temperature T || the model's). 0 (default) trains on the labels only.
        distill_temperature: the temperature T of the distillation term.
    """

    #: the numeric fields' rules (set below the class), checked in `__post_init__` and shown in `--help`
    number_rules: ClassVar[dict[str, NumberRule]]

    max_steps: int = 100
    num_train_epochs: float = 1.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    weight_decay: float = 0.0
    warmup: float = 0.0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 10
    evaluate_before: bool = True
    distill_alpha: float = 0.0
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        check_numbers(self, _FINETUNE_NUMBERS)
        if self.max_steps == 0 or self.max_steps < -1:
            raise InvalidConfigError(
                f"FinetuneConfig.max_steps must be >= 1 (or -1 for epochs), got {self.max_steps}.",
                field="max_steps",
                value=self.max_steps,
            )
        if not isinstance(self.lr_scheduler_type, str):
            raise InvalidConfigError(
                f"FinetuneConfig.lr_scheduler_type must be a scheduler name, got {self.lr_scheduler_type!r}.",
                field="lr_scheduler_type",
                value=self.lr_scheduler_type,
            )
        if not isinstance(self.evaluate_before, bool):
            raise InvalidConfigError(
                f"FinetuneConfig.evaluate_before must be true or false, got {self.evaluate_before!r}.",
                field="evaluate_before",
                value=self.evaluate_before,
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Builds a config from a dict, rejecting unknown keys so that typos do not pass silently."""
        return strict_from_dict(cls, values)

    def check_teachers(self, count: int) -> None:
        """Raises `InvalidConfigError` unless teachers are given exactly when `distill_alpha` > 0."""
        if bool(count) != (self.distill_alpha > 0):
            raise InvalidConfigError(
                "distill_alpha > 0 needs teachers (--teachers), and teachers need distill_alpha > 0 "
                f"(got distill_alpha={self.distill_alpha} and {count} teacher(s)).",
                field="distill_alpha",
                value=self.distill_alpha,
            )

    def training_arguments(self, output_dir: str | Path, progress: bool = True, **overrides):
        """`TrainingArguments` for this recipe; `overrides` are passed through (any `TrainingArguments` field)."""
        import torch
        from transformers import TrainingArguments

        has_accelerator = (
            torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        )
        values = dict(
            output_dir=str(output_dir),
            max_steps=self.max_steps,
            num_train_epochs=self.num_train_epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.batch_size,
            per_device_eval_batch_size=self.eval_batch_size,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup,
            lr_scheduler_type=self.lr_scheduler_type,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            logging_steps=self.logging_steps,
            eval_strategy="no",
            save_strategy="no",  # the final model is saved once, by the caller's output_dir
            report_to="none",
            disable_tqdm=not progress,
            log_level="warning",
            # Without an accelerator, say so: accelerate then runs several processes (torchrun) on gloo, where it
            # would otherwise leave each process training alone. Pinning memory only helps copies to a device.
            use_cpu=not has_accelerator,
            dataloader_pin_memory=has_accelerator,
        )
        values.update(overrides)
        return TrainingArguments(**values)  # type: ignore[arg-type]  # the values are checked by TrainingArguments


# numeric FinetuneConfig fields (warmup: steps, or a fraction of all steps when < 1; the seed feeds numpy)
_FINETUNE_NUMBERS = {
    "max_steps": NumberRule(int),
    "num_train_epochs": NumberRule(float, 0, low_open=True),
    "learning_rate": NumberRule(float, 0, low_open=True),
    "batch_size": NumberRule(int, 1),
    "eval_batch_size": NumberRule(int, 1),
    "weight_decay": NumberRule(float, 0),
    "warmup": NumberRule(float, 0),
    "max_grad_norm": NumberRule(float, 0),
    "seed": NumberRule(int, 0, 2**32 - 1),
    "logging_steps": NumberRule(int, 1),
    "distill_alpha": NumberRule(float, 0, 1),
    "distill_temperature": NumberRule(float, 0, low_open=True),
}

# the numeric rules of each config class, for the CLI's help (which states each field's range)

FinetuneConfig.number_rules = _FINETUNE_NUMBERS
