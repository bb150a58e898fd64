"""Finetuning with teachers: the `Trainer` loss mixed with distillation from the teachers' mean prediction.

A fused model's parents are the natural teachers of its finetune: their ensemble is what one-shot fusion tries to
match (`engine/refine.py` uses the same target without labels). The loss is (1 - alpha) x the model's own
cross-entropy + alpha x T² x KL(mean of the teachers' softmax at temperature T || the model's softmax at T)
(Hinton et al., 2015; the T² keeps the gradient scale of the soft term independent of T). Written here because
`transformers` ships no distillation loss for classifiers; it is one `compute_loss` override.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, Trainer

from ..errors import IncompatibleModelsError


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss adds distillation from `teachers` (none, or `alpha` = 0: the plain `Trainer` loss)."""

    def __init__(self, teachers: list[PreTrainedModel], alpha: float, temperature: float, **kwargs):
        super().__init__(**kwargs)
        self.teachers, self.alpha, self.temperature = teachers, alpha, temperature
        if teachers:
            # the loss below is a per-batch mean, as the model's own; no re-scaling by the items in the batch
            self.model_accepts_loss_kwargs = False
            for teacher in teachers:
                teacher.to(self.args.device).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.teachers:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        features = {name: value for name, value in inputs.items() if name != "labels"}
        t = self.temperature
        with torch.no_grad():
            target = sum(teacher(**features).logits.div(t).softmax(-1) for teacher in self.teachers)
            target = target / len(self.teachers)
        soft = torch.nn.functional.kl_div(outputs.logits.div(t).log_softmax(-1), target, reduction="batchmean")
        loss = (1 - self.alpha) * outputs.loss + self.alpha * t * t * soft
        return (loss, outputs) if return_outputs else loss


def check_teachers(teachers: list[PreTrainedModel], model: PreTrainedModel) -> list[PreTrainedModel]:
    """Returns `teachers` when each predicts the model's labels in the model's order; raises otherwise."""
    labels = model.config.id2label
    for k, teacher in enumerate(teachers):
        if teacher.config.id2label != labels:
            raise IncompatibleModelsError(
                f"Teacher {k} predicts {sorted(teacher.config.id2label.values())}, the model "
                f"{sorted(labels.values())} (in this order: {[labels[i] for i in sorted(labels)]}); distillation "
                "compares their output distributions class by class, so give teachers with the model's labels."
            )
    return teachers
