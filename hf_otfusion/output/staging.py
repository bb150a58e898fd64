"""Where a command may write its output directory, and how the directory gets there without losing files.

`fuse` and `finetune` write a whole directory (weights, card, provenance), and `--overwrite` replaces one. Three
rules keep a mistyped `--out` from destroying anything:

- Paths that cannot be an output are refused before any work: the working directory or one of its ancestors
  (`--out .`), the home directory or one of its ancestors, the directory of an input (a parent, a base, a data
  set), one inside it or one around it, a file, and a symbolic link.
- The output is written into a staging directory next to the *resolved* target (so on its file system, where a
  rename is atomic), named `.OUT.otfusion-staging-*` and locked (`flock`) for as long as the run writes it.
- An old output is replaced by a swap: it is renamed aside (`.OUT.otfusion-old-*`), the new one renamed in, and
  only then the old one deleted. An interrupted `--overwrite` leaves the old output or the new one, never neither.

Staging and aside directories that killed runs left behind are told apart from live ones by their lock, and the
next run that writes the same `--out` removes them (or, when `--out` is missing, puts the aside one back).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import NonFiniteWeightsError, OutputExistsError, UnsafeOutputError

try:  # POSIX; elsewhere leftovers are only named, never removed, since their owner cannot be told dead or alive
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

STAGING, ASIDE = "otfusion-staging", "otfusion-old"


def check_output_dir(
    out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = (), flag: str = "--out"
) -> Path:
    """Returns the absolute path `out` resolves to, once writing a directory there can destroy nothing.

    Leftovers of interrupted runs that wrote the same path are cleaned up first (see the module docstring).

    Args:
        out: the requested output directory.
        overwrite: whether an existing non-empty directory may be replaced.
        inputs: local paths the command reads (parents, base model, data); the output may not be, hold or lie
            inside any of them. Strings that are not existing paths (Hub ids) are skipped.
        flag: how messages name the option (`--out`, `output_dir`).

    Raises:
        UnsafeOutputError: `out` is a symlink, a file, the working or home directory or an ancestor of one,
            overlaps an input, or lies in a directory that is not writable.
        OutputExistsError: `out` is a non-empty directory and `overwrite` is False.
    """
    given = Path(out).expanduser()
    if given.is_symlink():
        raise UnsafeOutputError(
            f"{flag} {out} is a symbolic link (to {os.readlink(given)}); replacing it would act on whatever it "
            f"points to. Pass the real directory ({given.resolve()}) or a new path.",
            path=given,
        )
    target = given.resolve()
    if target.exists() and not target.is_dir():
        raise UnsafeOutputError(
            f"{flag} {out} is a file, not a directory; --overwrite only replaces directories. Remove the file or "
            "choose another path.",
            path=target,
        )
    for role, protected in _protected_directories():
        if target == protected or target in protected.parents:
            relation = "is" if target == protected else "is an ancestor of"
            raise UnsafeOutputError(
                f"{flag} {out} {relation} {role} ({protected}); writing the output there would replace everything "
                f"in it. Pass a new directory, e.g. {flag} {protected / 'fused'}.",
                path=target,
            )
    for source in inputs:
        path = Path(source).expanduser()
        if not path.exists():
            continue
        path = path.resolve()
        if target == path or target in path.parents or path in target.parents:
            relation = "is" if target == path else "contains" if target in path.parents else "lies inside"
            raise UnsafeOutputError(
                f"{flag} {out} {relation} the input {source} ({path}); the output must not replace or mix with what "
                "the command reads. Choose a path outside it.",
                path=target,
            )
    writable = next((p for p in target.parents if p.exists()), target)  # where the staging directory goes
    if not os.access(writable, os.W_OK | os.X_OK):
        raise UnsafeOutputError(
            f"{flag} {out}: {writable} is not writable, so the output cannot be created there. Choose a directory "
            "you can write to.",
            path=target,
        )
    recover_interrupted(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{flag} {out} exists and is not empty; choose another path or pass --overwrite (overwrite=True) to "
            "replace it.",
            path=target,
        )
    return target


class StagedOutput:
    """A locked staging directory next to `target`: write into `path`, then `publish()` swaps it into place.

    Create it with `stage_output`, which also removes it when the block fails.
    """

    def __init__(self, target: Path, path: Path, lock: int | None, overwrite: bool) -> None:
        self.target, self.path, self.overwrite = target, path, overwrite
        self._lock = lock
        self.published = False

    def publish(self) -> Path:
        """Moves the staged directory to `target`, replacing an old one by a swap; returns `target`.

        Raises:
            OutputExistsError: a non-empty `target` appeared while the run was writing, and `overwrite` is False.
            UnsafeOutputError: `target` became a file or a symbolic link meanwhile.
        """
        target = self.target
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            check_output_dir(target, overwrite=self.overwrite)  # raises the message for what is there now
        if not target.exists():
            os.rename(self.path, target)
        else:
            if any(target.iterdir()) and not self.overwrite:
                raise OutputExistsError(
                    f"{target} appeared while the run was writing and is not empty; the result was discarded. "
                    "Choose another path or pass --overwrite.",
                    path=target,
                )
            self._swap()
        self.published = True
        self.close()
        return target

    def _swap(self) -> None:
        target = self.target
        aside = target.parent / f".{target.name}.{ASIDE}-{os.getpid()}-{secrets.token_hex(4)}"
        lock = _try_lock(target)  # held while aside, so no other run takes it for a leftover
        try:
            os.rename(target, aside)
            try:
                os.rename(self.path, target)
            except BaseException:
                os.rename(aside, target)  # the old output goes back where it was
                raise
            shutil.rmtree(aside, ignore_errors=True)
            if aside.exists():
                logger.warning("could not delete the previous output, moved aside to %s; delete it by hand", aside)
        finally:
            _unlock(lock)

    def discard(self) -> None:
        """Deletes the staging directory, unless it was published."""
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Releases the flock on the staging directory (called by `publish` and `discard`)."""
        _unlock(self._lock)
        self._lock = None


@contextmanager
def stage_output(target: Path, *, overwrite: bool, name: str | None = None) -> Iterator[StagedOutput]:
    """A fresh `StagedOutput` for the checked `target` (see `check_output_dir`); removed unless published.

    Args:
        target: the absolute output path `check_output_dir` returned.
        overwrite: whether `publish()` may replace a non-empty directory.
        name: a fixed suffix instead of a random one, for runs whose processes must agree on the staging path
            (the `Trainer` saves from every process); a second run staging the same name is refused while the
            first holds its lock.

    Raises:
        UnsafeOutputError: the staging directory cannot be created (read-only or missing parent, permissions).
        OutputExistsError: another live run is staging the same `name`.
    """
    recover_interrupted(target)
    path = staging_path(target, name if name is not None else f"{os.getpid()}-{secrets.token_hex(4)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise OutputExistsError(
            f"Another run is writing {target} (its staging directory {path} is in use); wait for it to finish or "
            "choose another path.",
            path=target,
        ) from None
    except OSError as error:
        raise UnsafeOutputError(
            f"Cannot create the output next to {target}: {error.strerror or error}. Choose a directory you can "
            "write to.",
            path=target,
        ) from error
    stage = StagedOutput(target, path, _try_lock(path), overwrite)
    try:
        yield stage
    finally:
        stage.discard()


def staging_path(target: Path, name: str) -> Path:
    """Where `stage_output(target, name=name)` stages; other processes of the same run pass it to collectives."""
    return target.parent / f".{target.name}.{STAGING}-{name}"


def recover_interrupted(target: Path) -> list[Path]:
    """Removes the staging and aside directories of `target` that killed runs left; returns what it removed.

    An aside directory is the previous output: when `target` is missing (the run was killed mid-swap) it is
    renamed back instead. Directories a live run holds locked are left alone; without `flock` every leftover is
    only named in a warning.
    """
    handled = []
    if not target.parent.is_dir():
        return handled
    prefixes = (f".{target.name}.{STAGING}-", f".{target.name}.{ASIDE}-")
    for leftover in sorted(target.parent.iterdir()):
        if not leftover.name.startswith(prefixes) or leftover.is_symlink() or not leftover.is_dir():
            continue
        lock = _try_lock(leftover)
        if lock is None:
            if fcntl is None:
                logger.warning("%s was left by an earlier run writing %s; delete it if no run is active", leftover,
                               target)  # fmt: skip
            continue
        try:
            if leftover.name.startswith(prefixes[1]) and not target.exists():
                os.rename(leftover, target)
                logger.warning("restored the previous output %s from %s (an interrupted --overwrite)", target,
                               leftover)  # fmt: skip
            else:
                shutil.rmtree(leftover, ignore_errors=True)
                logger.warning("removed %s, left by an interrupted run", leftover)
        finally:
            _unlock(lock)
        handled.append(leftover)
    return handled


def _protected_directories() -> Iterator[tuple[str, Path]]:
    """The working directory and the home directory: never an output, nor may an output contain them."""
    for role, where in (("the working directory", Path.cwd), ("the home directory", Path.home)):
        try:
            yield role, where().resolve()
        except (OSError, RuntimeError):  # a deleted working directory, no HOME
            continue


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive `flock` on directory `path`; None if a live run holds it (or no
    `flock` here)."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def _unlock(descriptor: int | None) -> None:
    if descriptor is not None:
        os.close(descriptor)  # closing the last descriptor releases the flock


def check_fused_finite(model, dtype: str | None = None) -> None:
    """Raises `NonFiniteWeightsError` naming the first fused tensor with NaN or inf (so nothing is written)."""
    from ..engine.compatibility import first_non_finite  # here, not above: the output guard imports without torch

    name = first_non_finite(model.state_dict().items())
    if name is not None:
        cast = f" after the cast to {dtype}" if dtype else ""
        raise NonFiniteWeightsError(
            f"The fused model has NaN or infinite values in {name}{cast}; nothing was written. Check the parents, "
            "--weights and --scale" + (", or save in a wider --dtype." if dtype else "."),
            tensor=name,
        )
