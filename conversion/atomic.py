"""Outputs that appear whole or not at all: write into a temp sibling, then rename it into place.

The temp dir/file is created next to the target (same file system, so the final rename is atomic)
with the process umask applied, like any other new file. A crash (or Ctrl-C) before the rename leaves
the target untouched; the temp entry is removed on any exception that reaches us.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any


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


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir `.<name>.tmp-<random>` next to `path`; on success it becomes `path`.

    An existing `path` raises `OutputExistsError` unless `overwrite`; then the old one is moved aside,
    the new one renamed in, and the old deleted (restored if the rename fails). On any exception,
    KeyboardInterrupt included, the temp dir is deleted and `path` is as it was.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _make_sibling_dir(path, "tmp")
    try:
        yield tmp
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a synced temp file renamed over it: never half-written."""
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
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_text` of `obj` as indented JSON with sorted keys and a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
