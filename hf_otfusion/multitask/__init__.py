"""Multi-task merging: fine-tunes of one base with different heads share one merged encoder (see `merge`)."""

from .merge import base_with_head, encoder_view, merge_tasks, task_outputs, write_tasks
from .result import MultiTaskResult, RunRecord, task_repo_id

__all__ = [
    "MultiTaskResult",
    "RunRecord",
    "base_with_head",
    "encoder_view",
    "merge_tasks",
    "task_outputs",
    "task_repo_id",
    "write_tasks",
]
