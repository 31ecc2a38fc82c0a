"""All-or-nothing outputs for every job: each file is first written beside its target under a temporary
name; `commit` renames them into place in order and runs the writers that keep their own atomicity
(a report folder, JSON on stdout). If anything fails, what this set wrote is removed and any file it
replaced is put back, so an interrupted or failed command never leaves a half-written output or a
partial set behind, and never loses the previous complete one (last epoch's checkpoint, say)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


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
        d = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
                _keep_default_permissions(tmp)
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


def _keep_default_permissions(path: Path) -> None:
    """mkstemp creates 0600 files; give an output the permissions a plain open() would have."""
    if path.is_file():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


def report_html(folder: str | os.PathLike | None) -> Path | None:
    """The file a --report folder's report.html is (its PNGs sit beside it)."""
    return None if folder is None else Path(folder) / "report.html"


def check_paths(inputs: dict[str, str | os.PathLike | None], outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output that would overwrite an input or another output (one line).
    Keys are how the user named each path (``-o``, ``--json``, ``MODEL``); None and '-' are skipped."""
    from wasi_compress.errors import UserError

    def key(path) -> str | None:
        return None if path is None or str(path) == "-" else os.path.realpath(os.fspath(path))

    seen_inputs = {key(p): name for name, p in inputs.items() if key(p) is not None}
    seen_outputs: dict[str, str] = {}
    for name, path in outputs.items():
        k = key(path)
        if k is None:
            continue
        if k in seen_inputs:
            raise UserError(f"{name} {path} is the input {seen_inputs[k]}; it would be overwritten: write the output "
                            "somewhere else")
        if k in seen_outputs:
            raise UserError(f"{name} and {seen_outputs[k]} name the same file {path}; give each output its own path")
        seen_outputs[k] = name
