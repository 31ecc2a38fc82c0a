"""All-or-nothing outputs for every job: each file is first written beside its target under a temporary
name; `commit` renames them into place in order and runs the writers that keep their own atomicity
(a report folder, JSON on stdout). If anything fails, what this set wrote is removed and any file it
replaced is put back, so an interrupted or failed command never leaves a half-written output or a
partial set behind, and never loses the previous complete one (last epoch's checkpoint, say)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator


class Outputs:
    """A set of outputs committed together. Use as a context manager: temporaries go on exit."""

    def __init__(self) -> None:
        self._moves: list[tuple[Path, Path]] = []      # (temporary, final), in commit order
        self._writers: list[Callable[[], Path | None]] = []
        self._dirs: list[Path] = []

    def tempdir(self, target: str | os.PathLike) -> Path:
        """A private folder beside `target` for temporaries (removed when the set closes)."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        d = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
        self._dirs.append(d)
        return d

    def stage(self, target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
        """Write `target` now, under a temporary name with the same file name; renamed on commit.
        Returns the temporary path (to measure what was written)."""
        tmp = self.tempdir(target) / Path(target).name
        write(tmp)
        self._moves.append((tmp, Path(target)))
        return tmp

    def move(self, temporary: Path, target: str | os.PathLike) -> None:
        """Rename an already written temporary to `target` on commit."""
        self._moves.append((Path(temporary), Path(target)))

    def then(self, writer: Callable[[], Path | None]) -> None:
        """Run `writer` on commit, after the renames (it returns the path it wrote, if any)."""
        self._writers.append(writer)

    def commit(self) -> list[Path]:
        """Put every output in place; on failure remove what this commit wrote and restore the files it
        replaced, then re-raise."""
        written: list[Path] = []
        replaced: list[tuple[Path, Path]] = []  # (backup, final)
        try:
            for tmp, final in self._moves:
                keep_default_permissions(tmp)
                if final.is_file():
                    backup = tmp.with_name(tmp.name + ".previous")
                    os.replace(final, backup)
                    replaced.append((backup, final))
                os.replace(tmp, final)
                written.append(final)
            for writer in self._writers:
                path = writer()
                if path is not None:
                    written.append(Path(path))
        except BaseException:
            for path in written:
                Path(path).unlink(missing_ok=True)
            for backup, final in replaced:
                os.replace(backup, final)
            raise
        finally:
            self._moves.clear()
            self._writers.clear()
            self.close()
        return written

    def close(self) -> None:
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def temp_prefix(target: str | os.PathLike) -> str:
    """The name every temporary of `target` starts with: ``.{name}.{pid}.`` (then random, then ``.tmp``),
    so that a later run can tell a temporary left by a killed writer from one a live writer still owns."""
    return f".{Path(target).name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `target` (files and folders) whose writer process is gone (a kill -9);
    never one a live process owns, nor one without a PID in its name. Returns what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def lock_outputs(paths: Iterable[str | os.PathLike | None]) -> Iterator[list[Path]]:
    """Hold an exclusive lock file (``.{name}.lock``, holding this process's PID) beside each output for
    the whole block, so that two runs cannot write the same output; a second run is refused with one
    line. A lock whose process is gone (a kill -9) is taken over. None and '-' are skipped."""
    targets = {Path(os.path.abspath(os.fspath(p))): str(p) for p in paths if p is not None and str(p) != "-"}
    held: list[Path] = []
    created: list[Path] = []
    try:
        for target, shown in targets.items():
            created += _make_parents(target.parent)
            held.append(_take_lock(target, shown))
            remove_stale_temporaries(target)  # with the lock held, a dead writer's temporaries are garbage
        yield held
    finally:
        for lock in reversed(held):
            _release_lock(lock)
        for folder in reversed(created):  # folders made only for a lock, if nothing else was written there
            with contextlib.suppress(OSError):
                folder.rmdir()


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the ones created (deepest last)."""
    from wasi_compress.errors import UserError

    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{d}: the output folder cannot be created ({exc.strerror or exc})") from exc
    return list(reversed(missing))


def _take_lock(target: Path, shown: str, attempts: int = 50) -> Path:
    from wasi_compress.errors import UserError

    lock = lock_path(target)
    for _ in range(attempts):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(lock)
            if pid is None:  # being written this instant, or left empty: look again shortly
                time.sleep(0.05)
                if _lock_owner(lock) is None and _age(lock) > 2.0:
                    _remove_if_unchanged(lock, None)
                continue
            if pid_alive(pid):
                raise UserError(f"{shown} is being written by process {pid}; wait for it or choose another output")
            _remove_if_unchanged(lock, pid)  # a stale lock: its writer was killed
            continue
        except OSError as exc:
            raise UserError(f"{shown}: cannot lock the output ({exc.strerror or exc})") from exc
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise UserError(f"{shown}: could not take the lock {lock}; remove it if no run is writing {shown}")


def _lock_owner(lock: Path) -> int | None:
    try:
        text = lock.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_if_unchanged(lock: Path, pid: int | None) -> None:
    """Remove a stale lock, after checking once more that it still names the dead process."""
    if _lock_owner(lock) == pid:
        with contextlib.suppress(OSError):
            lock.unlink()


def _release_lock(lock: Path) -> None:
    if _lock_owner(lock) == os.getpid():
        with contextlib.suppress(OSError):
            lock.unlink()


def keep_default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; give an output the permissions a plain open() would have."""
    if path.is_file():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


# Every file a --report folder may hold (report_html.write_report writes no other; a test holds it to that).
REPORT_NAME = "report.html"
REPORT_PLOTS = ("analyze-energy.png", "analyze-memory.png", "analyze-jactus-ranks.png", "convert-ranks.png",
                "convert-pareto.png", "finetune-memory.png", "finetune-jactus-ranks.png", "finetune-epochs.png")


def report_html(folder: str | os.PathLike | None) -> Path | None:
    """The file a --report folder's report.html is (its PNGs sit beside it)."""
    return None if folder is None else Path(folder) / REPORT_NAME


def _with_report_plots(outputs: dict[str, str | os.PathLike | None]) -> dict[str, str | os.PathLike | None]:
    """The outputs, plus the plots beside each report.html: a report folder writes them too."""
    out = dict(outputs)
    for name, path in outputs.items():
        if path is not None and str(path) != "-" and Path(path).name == REPORT_NAME:
            out.update({f"{name} ({plot})": Path(path).with_name(plot) for plot in REPORT_PLOTS})
    return out


def check_paths(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None],
                data_folders: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse, before any work, an output that would overwrite an input or another output, that would land
    inside an input image folder (every file there is data), or that cannot be written (one line). Keys
    are how the user named each path (``-o``, ``--json``, ``MODEL``, ``--data``); None and '-' are
    skipped. A report.html output stands for its whole folder (the plots too)."""
    from wasi_compress.errors import UserError

    def key(path) -> str | None:
        return None if path is None or str(path) == "-" else os.path.realpath(os.fspath(path))

    seen_inputs = {key(p): name for name, p in inputs.items() if key(p) is not None}
    folders = {key(p): name for name, p in (data_folders or {}).items() if key(p) is not None and os.path.isdir(key(p))}
    seen_outputs: dict[str, str] = {}
    for name, path in _with_report_plots(outputs).items():
        k = key(path)
        if k is None:
            continue
        if k in seen_inputs:
            raise UserError(f"{name} {path} is the input {seen_inputs[k]}; it would be overwritten: write the output "
                            "somewhere else")
        inside = next((folder for folder in folders if k.startswith(folder.rstrip(os.sep) + os.sep)), None)
        if inside is not None:
            raise UserError(f"{name} {path} is inside the input folder {folders[inside]} {data_folders[folders[inside]]}; "
                            "an output there would change its data: write it somewhere else")
        if k in seen_outputs:
            raise UserError(f"{name} and {seen_outputs[k]} name the same file {path}; give each output its own path")
        seen_outputs[k] = name
    for name, path in outputs.items():
        if key(path) is not None:
            check_writable(name, path)


def check_writable(name: str, path: str | os.PathLike) -> None:
    """Refuse (one line) an output that cannot be written, before any work starts: a folder in its place,
    something that is not a regular file (a device, a FIFO: the rename would replace it), a parent that
    is a file, or a folder this process cannot create files in (read-only, /proc). The probe is an
    empty temporary folder in the nearest existing folder, removed at once: missing folders below it
    are made only when the output is written."""
    from wasi_compress.errors import UserError

    target = Path(os.path.abspath(os.fspath(path)))
    shown = f"{name} {path}" if name != str(path) else str(path)
    if target.is_dir():
        raise UserError(f"{shown} is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise UserError(f"{shown} is not a regular file (writing it would replace it); give a file path")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{shown}: {folder} is a file, not a folder; choose an output path in a folder")
    try:
        probe = tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"{shown}: cannot write in {folder} ({exc.strerror or exc}); choose a folder you can "
                        "write to") from None
    os.rmdir(probe)
