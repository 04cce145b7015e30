"""The cache folder (downloaded models and data) and atomic file writes.

Everything elastiformer writes goes through `atomic_write_*` or `atomic_dir`: the file or folder appears under its
final name only once it is complete (written, flushed to disk, then renamed), so an interrupted run - even one killed
with SIGKILL - never leaves a half-written file that a later run loads. Temporary names start with a dot and end in
`.tmp`; a killed run may leave them behind, and nothing ever reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_dir() -> Path:
    """`$ELASTIFORMER_CACHE`, else `$XDG_CACHE_HOME/elastiformer`, else `~/.cache/elastiformer`."""
    env = os.environ.get("ELASTIFORMER_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "elastiformer"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide results from teammates: the umask decides, as for open()
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # (mkdtemp's 0700, likewise)
    try:
        yield tmp
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(file)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def committed_dir(path: str | os.PathLike) -> Path:
    """`path`, or the complete previous version if a crash struck between the two renames of `atomic_dir` (when
    `path` had been moved aside to `.<name>.old` and the new version not yet moved in): it is put back and used."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        try:
            os.replace(old, path)
        except OSError:
            return old
    return path


def _fsync(path: Path) -> None:
    """Flush a file's bytes to disk before it is renamed into place (a rename can outlive unflushed data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON; paths are written as strings (options often hold them)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"  # (fails before any file exists)
    atomic_write_text(path, text)


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it can be written to, before any long work starts."""
    from .errors import ElastiformerError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: ranks of one run probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ElastiformerError(f"cannot write to output folder {path} ({err.strerror}): pass a writable "
                                "folder") from err
    return path
