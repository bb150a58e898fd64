"""Progress bars on the command line: all off for `-q`, and transformers' per-load bar hidden."""

from __future__ import annotations


def silence_progress_bars() -> None:
    """Turns off the progress bars of huggingface_hub, datasets and transformers (for `-q`)."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def hide_weight_loading_bars() -> None:
    """Hides transformers' "Loading weights" bar, which every `from_pretrained` draws, keeping all other bars.

    A CLI run loads each parent several times (compatibility, fusion, evaluation, report): a bar per load buries
    the bars of the stages that take time. Downloads keep theirs, and `-q` still silences everything.
    """
    from transformers.utils import logging as transformers_logging

    if not hasattr(transformers_logging, "set_tqdm_hook"):  # older transformers: nothing to hook into
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    transformers_logging.set_tqdm_hook(hook)
