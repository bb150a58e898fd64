"""Tiny randomised models of every shipped family, and the inputs to run them on."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the local Hub server needs a token for writes; tests' HubServer() and clients (HF_TOKEN) share this one
os.environ.setdefault("OTFUSION_HUB_TOKEN", "test-token-not-secret")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention on a 2-core machine

TEXT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
IMAGE = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip

# name -> (model class, config); each is small enough to fuse in well under a second
FAMILIES = {
    "bert-seqcls": (T.BertForSequenceClassification, lambda: T.BertConfig(**TEXT, num_labels=3)),
    "bert-mlm": (T.BertForMaskedLM, lambda: T.BertConfig(**TEXT)),
    "bert-base": (T.BertModel, lambda: T.BertConfig(**TEXT)),
    "vit-cls": (T.ViTForImageClassification, lambda: T.ViTConfig(**IMAGE, num_labels=3)),
    "vit-base": (T.ViTModel, lambda: T.ViTConfig(**IMAGE)),
    "deit-teacher": (T.DeiTForImageClassificationWithTeacher, lambda: T.DeiTConfig(**IMAGE, num_labels=3)),
    "deit-cls": (T.DeiTForImageClassification, lambda: T.DeiTConfig(**IMAGE, num_labels=3)),
    "deit-base": (T.DeiTModel, lambda: T.DeiTConfig(**IMAGE)),
    "roberta-seqcls": (T.RobertaForSequenceClassification, lambda: T.RobertaConfig(**TEXT, num_labels=3)),
    "roberta-mlm": (T.RobertaForMaskedLM, lambda: T.RobertaConfig(**TEXT)),
    "roberta-base": (T.RobertaModel, lambda: T.RobertaConfig(**TEXT)),
}


def randomise(model: T.PreTrainedModel, seed: int) -> T.PreTrainedModel:
    """Every parameter drawn at random, so LayerNorms and biases are non-trivial and units distinguishable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if param.ndim > 1 else 0.5))
    return model.eval()


def build(family: str, seed: int = 0, **overrides) -> T.PreTrainedModel:
    model_class, make_config = FAMILIES[family]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return randomise(model_class(config), seed)


def inputs_for(model: T.PreTrainedModel, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs; text batches have padding at the end of some rows."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if getattr(config, "vocab_size", None):  # text
        ids = torch.randint(1, config.vocab_size, (batch, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[batch // 2 :, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    return {"pixel_values": torch.randn(shape, generator=generator)}


def outputs(model: T.PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (all heads of DeiT-with-teacher), or the last hidden state of a bare encoder."""
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "cls_logits", None) is not None:
        return torch.cat([out.cls_logits, out.distillation_logits], dim=-1)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def saved_parents(tmp_path):
    """A tiny ViT classifier and two directories: it saved, and a permuted copy of it saved (the same function)."""
    from hf_otfusion import permute_model

    parent = build("vit-cls")
    paths = [tmp_path / "a", tmp_path / "b"]
    parent.save_pretrained(paths[0])
    permute_model(parent, seed=1).save_pretrained(paths[1])
    return parent, [str(p) for p in paths]
