"""Writing files so that nothing the user had is lost: a temporary file (or folder) beside the output, renamed into
place; never over an input; a full disk or another OS error in one line; and what a killed write left, removed
by the next write there."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import SeifyError, first_line


def umask() -> int:
    """This process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object], *, force: bool = False,
                 inputs: tuple = ()) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place.

    An existing ``path`` is kept unless ``force``; a path that is one of ``inputs`` is never written. The file
    gets the permissions a plain ``open`` would give (mkstemp's are 0600).
    """
    path = check_writable(path, force=force, inputs=inputs)
    tmp = None
    try:
        with _nothing_changed(path):
            fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def _nothing_changed(path: Path):
    """A full disk or another OS error while writing ``path``: one line, saying that nothing there changed."""
    try:
        yield
    except Exception as e:
        problem = write_error(e, path)
        if problem is None:
            raise
        raise SeifyError(f"{problem}; nothing there was changed") from e


def sidecar_of(path: Path) -> Path:
    """Where a file keeps what does not fit in it (ONNX's external weights): NAME.data beside it."""
    return path.with_name(path.name + ".data")


def write_with_sidecars(path: Path, write: Callable[[str], object], *, force: bool = False) -> list[Path]:
    """``write(tmp)`` a file (and any ``sidecar_of`` it) in a temporary folder beside ``path``, then move them into
    place, the file last; with ``force`` a sidecar of the file replaced that the new one does not have goes too."""
    def move(tmp: str) -> list[Path]:
        write(str(Path(tmp) / path.name))
        written = sorted(Path(tmp).iterdir(), key=lambda p: p == Path(tmp) / path.name)
        if force and sidecar_of(path).name not in {f.name for f in written}:
            sidecar_of(path).unlink(missing_ok=True)
        for f in written:
            os.chmod(f, 0o666 & ~umask())
            os.replace(f, path.parent / f.name)
        return [path.parent / f.name for f in written]
    return _in_temporary_folder(path, move)


def replace_folder(path: Path, fill: Callable[[str], object], manifest: str, about: dict) -> None:
    """``fill(tmp)`` a temporary folder beside ``path``, list what it holds in ``manifest`` (with ``about``), and
    put it in the place of ``path``: the caller checks first that ``path`` holds nothing but an earlier such
    folder (``written_before``)."""
    def replace(tmp: str) -> None:
        fill(tmp)
        listing = {**about, "files": sorted(os.listdir(tmp))}
        (Path(tmp) / manifest).write_text(json.dumps(listing, indent=2) + "\n")
        for f in Path(tmp).iterdir():  # as a plain open would give them (safetensors writes 0600)
            os.chmod(f, 0o666 & ~umask())
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    _in_temporary_folder(path, replace)


def written_before(folder: Path, manifest: str) -> set[str]:
    """What ``replace_folder`` wrote in ``folder`` (its manifest lists it), the manifest included; empty if none."""
    try:
        listed = json.loads((folder / manifest).read_text())["files"]
        return {*listed, manifest} if isinstance(listed, list) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


_STALE = 3600  # seconds: a leftover of a seify that did not name its process is taken to be dead after this


def _temporary_prefix(path: Path) -> str:
    """``.NAME.PID.``: the temporary files of a write are named after their output and the process writing them,
    so that the next write there removes those a killed process left (``remove_leftovers``), and only those."""
    remove_leftovers(path)
    return f".{path.name}.{os.getpid()}."


def remove_leftovers(path: Path) -> None:
    """Remove what a killed write of ``path`` left beside it (its temporary file or folder): seify's own names
    alone, of a process no longer running (or, named before seify recorded the process, older than an hour)."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    leftover = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.(?:tmp|old)$")
    for entry in entries:
        match = leftover.match(entry.name)
        if match is None or _alive(match[1], entry):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _alive(pid: str | None, entry: Path) -> bool:
    if pid is None:
        try:
            return time.time() - entry.stat().st_mtime < _STALE
        except OSError:
            return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _in_temporary_folder(path: Path, work):
    """``work(tmp)`` with a temporary folder beside ``path``, removed afterwards whatever happens; a full disk or
    another OS error is one line, and leaves nothing."""
    tmp = tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with _nothing_changed(path):
            return work(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error(e: BaseException, path: Path) -> str | None:
    """What went wrong writing ``path``, in words, where it is the machine's doing (None: a bug of ours).

    A full disk reaches us as ENOSPC, as safetensors' SafetensorError ("No space left on device (os error 28)"),
    or as torch.save's "unexpected pos" with no reason at all: asked while the partial file still takes its
    space, the file system's free space tells.
    """
    from safetensors import SafetensorError
    text = str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in text or "os error 28" in text or \
            isinstance(e, (RuntimeError, SafetensorError)) and _full(path):
        return f"cannot write {path}: no space left on device ({_free(path)} free there)"
    if isinstance(e, OSError):
        return f"cannot write {path}: {e.strerror or first_line(e)}"
    if isinstance(e, SafetensorError) or isinstance(e, RuntimeError) and ("write" in text.lower() or
                                                                           "unexpected pos" in text):
        return f"cannot write {path}: {first_line(e)}"
    return None


_FULL = 1 << 20  # bytes: less than this free after a failed write is a full disk


def _folder(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.is_dir()), Path("."))


def _full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_folder(path)).free < _FULL
    except OSError:
        return False


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(_folder(path)).free / 1e6:.1f} MB"
    except OSError:
        return "unknown"


def check_writable(path: str | Path, *, force: bool = False, inputs: tuple = ()) -> Path:
    """Refuse to write over an input, or over an existing file without ``force``, before any work is done."""
    path = Path(path)
    for source in inputs:
        if source and Path(source).exists() and path.exists() and path.samefile(source):
            raise SeifyError(f"refusing to write over the input {source}; choose another output path")
    if path.is_dir():
        raise SeifyError(f"cannot write {path}: it is a folder; name a file")
    if path.exists() and not force:
        raise SeifyError(f"{path} already exists; pass {{force}} to replace it or choose another path", "force")
    if not path.parent.is_dir():
        raise SeifyError(f"cannot write {path}: {path.parent} is not an existing folder")
    check_folder_writable(path.parent)
    return path


def check_output_folder(folder: str | Path, *, force: bool = False) -> Path:
    """Refuse, before any work is done, an output folder that is a file, or one that holds something (unless
    ``force``), or one that cannot be created where it would go."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SeifyError(f"{folder} is a file; name a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise SeifyError(f"{folder} already exists; pass {{force}} to replace it or choose another path", "force")
    check_folder_writable(next(p for p in (folder, *folder.parents) if p.exists()))
    return folder


def check_folder_writable(folder: Path) -> None:
    """Create and remove a file there: the one test that also catches read-only and special file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SeifyError(f"cannot write in {folder}: {e.strerror or first_line(e)}") from e
