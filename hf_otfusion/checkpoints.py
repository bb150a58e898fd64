"""Parents given as checkpoints: loaded only when needed, every weight checked, or built weightless to plan with.

`fuse` takes parents as loaded models or as checkpoints. A checkpoint costs no memory until its turn comes, so
two checkpoints fuse in the memory of two models (see `fusion._align_and_average`); checks and plans run on its
skeleton, the model built on the meta device from its config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from .errors import CorruptCheckpointError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Checkpoint:
    """A saved model to load when it is needed.

    Attributes:
        location: a local checkpoint directory or a Hub model id.
        model_class: the class to load it as; default: the one its config.json's `architectures` names.
        name: how messages name it (default: `location`).
        use_safetensors: `False` only for pickle weights a user explicitly allowed.
        trust_remote_code: passed to transformers for a parent whose class is custom code.
    """

    location: str
    model_class: type[PreTrainedModel] | None = None
    name: str | None = None
    use_safetensors: bool = True
    trust_remote_code: bool = False

    def config(self):
        return AutoConfig.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)

    def saved_class(self, config=None) -> type[PreTrainedModel]:
        """`model_class`, or the transformers class the checkpoint was saved from."""
        if self.model_class is not None:
            return self.model_class
        config = config or self.config()
        architecture = (config.architectures or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            raise UnsupportedArchitectureError(
                f"{self.name or self.location} names architecture {architecture!r} in its config.json, which "
                "transformers does not provide; load the model yourself and pass the object.",
                model_type=getattr(config, "model_type", None),
                architecture=architecture,
            )
        return model_class

    def load(self) -> PreTrainedModel:
        """The model, in eval mode; a missing or misshapen weight is an error, not a random initialisation.

        transformers fills missing weights with random values and only warns; a fused model built on such a
        parent would be silently wrong.
        """
        from safetensors import SafetensorError

        name = self.name or self.location
        model_class = self.saved_class()
        try:
            loaded: Any = model_class.from_pretrained(
                self.location, use_safetensors=self.use_safetensors, output_loading_info=True,
                trust_remote_code=self.trust_remote_code, **init_kwargs(model_class, self.tensor_names()),
            )  # fmt: skip
            model, info = loaded  # a pair: with output_loading_info
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise CorruptCheckpointError(
                f"Parent {name} could not be loaded: {error}", path=self.location, source=name
            ) from error
        problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "mismatched_keys")}
        problems = {key: value for key, value in problems.items() if value}
        if problems:
            raise CorruptCheckpointError(
                f"Parent {name} does not hold the weights its config describes: {problems}. The checkpoint is "
                "incomplete or was saved from another class; re-export it with save_pretrained.",
                path=self.location,
                source=name,
            )
        return model.eval()

    def skeleton(self) -> PreTrainedModel:
        """The model built from its config on the meta device: names and shapes, no weights, no memory."""
        config = self.config()
        model_class = self.saved_class(config)
        return weightless_model(model_class, config, **init_kwargs(model_class, self.tensor_names()))

    def tensor_names(self) -> list[str] | None:
        """The names of the saved tensors, from a local checkpoint's safetensors index or header (else `None`)."""
        import json

        from safetensors import SafetensorError, safe_open

        folder = Path(self.location)
        try:
            if (folder / "model.safetensors.index.json").is_file():
                return list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
            if (folder / "model.safetensors").is_file():
                with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                    return list(handle.keys())
        except (OSError, ValueError, KeyError, SafetensorError):
            return None  # loading reports the unreadable file
        return None


ModelOrPath = PreTrainedModel | Checkpoint | str | Path


def init_kwargs(model_class: type[PreTrainedModel], tensor_names: list[str] | None) -> dict[str, Any]:
    """`add_pooling_layer=False` for a bare encoder saved without its pooler (`BertModel(config, False)`), else {}.

    The config does not record the choice; only the weight names do. Without it, loading would report the pooler
    missing (transformers would fill it at random).
    """
    if not tensor_names or any("pooler" in name.split(".") for name in tensor_names):
        return {}
    if "add_pooling_layer" not in inspect.signature(model_class.__init__).parameters:
        return {}
    return {"add_pooling_layer": False}


def weightless_model(model_class: type[PreTrainedModel], config, **kwargs: Any) -> PreTrainedModel:
    """`model_class` built from `config` on the meta device: every parameter's name and shape, no storage.

    The one way hf_otfusion builds a model from a config, for a checkpoint's skeleton and for the pre-flight's
    models of Hub parents whose weights are not downloaded yet; `kwargs` go to the constructor (`init_kwargs`).
    """
    with torch.device("meta"):
        return model_class._from_config(config, **kwargs)


def as_checkpoint(model: ModelOrPath) -> PreTrainedModel | Checkpoint:
    """A loaded model as is; a path or Hub id as a `Checkpoint` of its saved class."""
    if isinstance(model, PreTrainedModel | Checkpoint):
        return model
    return Checkpoint(str(model))


def load_parent(model: ModelOrPath) -> PreTrainedModel:
    """A parent as a model: loaded models pass through; checkpoints, paths and Hub ids are loaded (safetensors)."""
    model = as_checkpoint(model)
    return model if isinstance(model, PreTrainedModel) else model.load()


def skeleton(model: ModelOrPath) -> PreTrainedModel:
    """A model to check and plan with: a loaded model as is, a checkpoint as its weightless skeleton."""
    model = as_checkpoint(model)
    return model if isinstance(model, PreTrainedModel) else model.skeleton()
