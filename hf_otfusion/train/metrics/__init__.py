"""Classification metrics shipped as `evaluate` modules, loaded by path so they work without the Hub.

`evaluate.load("accuracy")` fetches a script from the Hub; the modules here are the same kind of script kept
inside the package, so `load_metric("accuracy")` works offline and behaves like any `evaluate` metric.
"""

from __future__ import annotations

import uuid
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with hf_otfusion."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs):
    """An `evaluate.EvaluationModule` for a shipped metric, computed locally.

    Args:
        name: one of `available_metrics()`.
        **kwargs: forwarded to `evaluate.load` (e.g. `config_name`).

    Returns:
        The loaded metric. It keeps its buffers in memory under a fresh experiment id, so several processes
        (torchrun workers, parallel tests) never share a cache file.

    Raises:
        FusionError: if `name` is not a shipped metric.
    """
    import evaluate

    from ...errors import FusionError

    if name not in available_metrics():
        raise FusionError(f"Unknown metric {name!r}; hf_otfusion ships {available_metrics()}.")
    kwargs.setdefault("keep_in_memory", True)
    kwargs.setdefault("experiment_id", uuid.uuid4().hex)
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
