"""Outputs that appear whole or not at all: write into a temp sibling, then rename it into place.

Every file grape-jax writes goes through `atomic_write` (statistics, plans, recipes, checkpoints'
metadata, safetensors shards); directories through `atomic_output_dir` / `resumable_output_dir`.

The temp dir/file is created next to the target (same file system, so the final rename is atomic)
with the process umask applied, like any other new file. A crash (or Ctrl-C) before the rename leaves
the target untouched; the temp entry is removed on any exception that reaches us.
`resumable_output_dir` is the variant for long writes: its work dir survives an interruption and a
rerun of the same job (same fingerprint) continues in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from grape_jax.base import jsonio


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""

    def __str__(self) -> str:  # FileExistsError's default str adds errno noise
        return str(self.args[0]) if self.args else "output exists"


def _sibling(path: str, tag: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}-{secrets.token_hex(4)}")


def _make_sibling_dir(path: str, tag: str) -> str:
    for _ in range(100):
        candidate = _sibling(path, tag)
        try:
            os.mkdir(candidate, 0o777)  # the kernel applies the umask
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary directory next to {path}")


def _commit(tmp: str, path: str) -> None:
    """Rename the finished `tmp` to `path`, replacing an existing `path` (restored if the rename fails)."""
    if os.path.lexists(path):
        old = _sibling(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.rename(tmp, path)


def _refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir `.<name>.tmp-<random>` next to `path`; on success it becomes `path`.

    An existing `path` raises `OutputExistsError` unless `overwrite`; then the old one is moved aside,
    the new one renamed in, and the old deleted (restored if the rename fails). On any exception,
    KeyboardInterrupt included, the temp dir is deleted and `path` is as it was.
    """
    path = os.path.abspath(os.fspath(path))
    _refuse_existing(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _make_sibling_dir(path, "tmp")
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class WorkDir:
    """A resumable output's work dir and whether it holds an earlier run's files for the same job."""

    path: str
    resumed: bool


PARTIAL_MARKER = ".grape-partial.json"


@contextlib.contextmanager
def resumable_output_dir(path: str | os.PathLike, *, fingerprint: str, overwrite: bool = False) -> Iterator[WorkDir]:
    """Like `atomic_output_dir`, but the work dir `.<name>.partial` survives an interruption.

    The work dir records `fingerprint` (what is being written); a later run with the same fingerprint
    reuses the files already completed there, one with another fingerprint starts afresh. The work dir
    is locked while in use (a second concurrent run is refused), renamed to `path` on success, kept on
    KeyboardInterrupt/SystemExit (and, of course, on SIGKILL) so the next run resumes, and deleted on
    any other exception. Files inside must themselves appear atomically (write `x.part`, rename to `x`).
    """
    path = os.path.abspath(os.fspath(path))
    _refuse_existing(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    work = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    marker = os.path.join(work, PARTIAL_MARKER)
    with _locked(work + ".lock", path):
        resumed = False
        if os.path.isdir(work):
            try:
                with open(marker, encoding="utf-8") as f:
                    resumed = json.load(f).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                resumed = False
        if not resumed and os.path.lexists(work):
            shutil.rmtree(work)
        os.makedirs(work, exist_ok=True)
        if not resumed:
            atomic_write_json(marker, {"fingerprint": fingerprint})
        try:
            yield WorkDir(work, resumed)
            os.remove(marker)
            _commit(work, path)
        except Exception:
            shutil.rmtree(work, ignore_errors=True)
            raise


@contextlib.contextmanager
def _locked(lock_path: str, target: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created; removed when released) while writing
    `target`."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(
                f"{target} is being written by another running process (lock {lock_path}); wait for it or stop it"
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """The one way grape-jax writes a file: `write(f)` into a temp sibling opened for binary writing,
    flushed and fsynced, then renamed over `path`. Never half-written; the temp file is removed on any
    exception (KeyboardInterrupt included)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of `text` as UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_text` of `obj` as indented JSON with sorted keys and a final newline."""
    atomic_write_text(path, jsonio.dumps(obj, indent=1, sort_keys=True) + "\n")
