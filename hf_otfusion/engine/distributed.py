"""The device fusion runs on, and the few collective steps that let it run on several processes.

Fusion is ordinary single-process code. Launched on N processes (`torchrun --nproc_per_node N -m
hf_otfusion.cli fuse ...` or `accelerate launch -m hf_otfusion.cli fuse ...`), each process takes every N-th
batch of the alignment data (`owned_batches`), accumulates its partial statistics, and a float64 sum over
processes (`all_reduce_sum_`, through accelerate's `reduce`) combines them. The transport maps are solved once,
on the main process, and broadcast (`broadcast_from_main`). Run alone, none of this starts anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import DeviceUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import PartialState


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """The device for the statistics forward passes and Sinkhorn solves; `None` keeps models where they are.

    `"auto"` is CUDA when a GPU is visible, else CPU.

    Raises:
        DeviceUnavailableError: `device` names no torch device, or a CUDA device was asked for but torch sees no GPU.
    """
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailableError(
            f"device={str(device)!r} is not a torch device; use cpu, cuda, cuda:N or auto.", device=str(device)
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={str(device)!r} was asked for, but torch sees no CUDA GPU (torch {torch.__version__}). "
            "Install a CUDA build of torch on a GPU machine, or use device='cpu' (or 'auto').",
            device=str(device),
        )
    return resolved


def launched_distributed() -> bool:
    """Whether this process is one of several started by torchrun / accelerate launch (or joined a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(device: torch.device | None) -> PartialState | None:
    """The accelerate state of this process when it is one of several, else `None`.

    The state is created only when the process was launched distributed: creating it in a single process
    would pin accelerate's device for the rest of the program (a later `Trainer` would inherit it). On CPU
    the processes talk over gloo, on GPUs over NCCL; an existing state (from the user's `Accelerator`) is
    reused as it is.
    """
    if not launched_distributed():
        return None
    from accelerate import PartialState

    return PartialState(cpu=device is None or device.type == "cpu")


def is_main_process(process: PartialState | None) -> bool:
    """True in a single process, and on the main process of a distributed run: the one that writes and pushes."""
    return process is None or process.is_main_process


def owned_batches(num_batches: int, process_index: int, num_processes: int) -> range:
    """The batch indices one process runs: every `num_processes`-th batch from its own index.

    Sharding whole batches (not samples) keeps every batch exactly as a single process would build it, so the
    per-batch statistics are bit for bit the same and the sharded sums equal the single-process ones to
    rounding; an uneven last round just leaves some processes one batch short, and no sample is padded in or
    counted twice.
    """
    return range(process_index, num_batches, num_processes)


def all_reduce_sum_(arrays: list[np.ndarray | torch.Tensor], process: PartialState) -> None:
    """Replaces every array by its sum over all processes, in place.

    Each array goes through accelerate's `reduce(..., "sum")` on the process group's device (CPU for gloo,
    the process's GPU for NCCL) one at a time, so the extra memory is one array, not all of them.
    """
    from accelerate.utils import reduce

    for array in arrays:
        local = torch.as_tensor(array)  # shares memory with a numpy array, so copy_ below writes it
        summed = reduce(local.to(process.device), reduction="sum")
        local.copy_(summed.to(local.device))


def gather_objects(obj: Any, process: PartialState) -> list[Any]:
    """One picklable object from every process, in process order."""
    from accelerate.utils import gather_object

    return gather_object([obj])


def broadcast_from_main(obj: Any, process: PartialState | None) -> Any:
    """The main process's `obj` on every process (pickled; for maps and diagnostics, not for large tensors)."""
    if process is None or process.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj if process.is_main_process else None])[0]


@contextmanager
def models_on(
    models: Sequence[torch.nn.Module], device: torch.device | None, changed: Sequence[torch.nn.Module] = ()
) -> Iterator[None]:
    """Runs the block with the models moved to `device`, then puts back their original tensors.

    Putting back the very tensors the models held (rather than copying back from the device) keeps the host
    memory as it was and keeps references to the old parameters valid, whatever happened on the device. The
    models in `changed` (those the block writes into: a refit, a repair) first have their parameters' values
    on the device copied into those original tensors, so the changes are kept.
    """
    if device is None:
        yield
        return
    params, buffers = [], []
    kept = {id(model) for model in changed}
    for model in {id(model): model for model in models}.values():
        for module in model.modules():
            params += [
                (module, name, p, p.data, id(model) in kept) for name, p in module.named_parameters(recurse=False)
            ]
            buffers += [(module, name, buffer) for name, buffer in module.named_buffers(recurse=False)]
        model.to(device)
    try:
        yield
    finally:
        # `to` moves a parameter's data in place, or (between unlike devices, e.g. meta) swaps in a new
        # Parameter: undo both, so tied parameters stay one object
        for module, name, param, data, keep in params:
            if keep:
                data.copy_(getattr(module, name).data)
            param.data = data
            setattr(module, name, param)
        for module, name, buffer in buffers:
            setattr(module, name, buffer)
