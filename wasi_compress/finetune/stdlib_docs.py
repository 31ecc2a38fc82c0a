"""``--data stdlib-docs``: a real text-classification task built from text that ships with Python itself,
with nothing downloaded.

Sentences come from the docstrings (module, class, function) of the standard library's own Python
sources, read with ``ast`` (never imported, so no module code runs), and each is labelled by the family
of the module it comes from: text, files, network, numbers, concurrency, formats (``FAMILIES``). A
sentence is a docstring paragraph's sentence of 6 to 40 words that starts with a capital, ends with a
full stop and is mostly letters; paragraphs with doctest lines are skipped; a sentence found in two
families is dropped. Each family keeps at most ``PER_CLASS`` sentences, chosen by a fixed seed from its
sorted set, so the task is the same on every run of the same Python version (the docstrings are that
version's). It is learnable but not trivial: many sentences name no module ("A RuntimeError is raised if
this method is called when the lock is unlocked.")."""

from __future__ import annotations

import ast
import importlib.util
import random
import re
import sys
from pathlib import Path

NAME = "stdlib-docs"
PER_CLASS = 250
SEED = 20260101
# family -> top-level standard-library modules or packages (a package's submodules included)
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "codecs", "locale", "gettext", "shlex"),
    "files": ("os", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "zipfile", "tarfile", "posixpath",
              "_pyio", "genericpath"),
    "network": ("socket", "http", "urllib", "email", "smtplib", "ftplib", "imaplib", "poplib", "ssl", "mailbox"),
    "numbers": ("_pydecimal", "fractions", "statistics", "random", "numbers", "colorsys"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent", "queue", "sched", "subprocess", "selectors"),
    "formats": ("json", "csv", "pickle", "xml", "configparser", "plistlib", "html", "tomllib", "base64"),
}
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _source_files(module: str) -> list[Path]:
    """The .py files of a standard-library module or package (tests left out), found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    origin = Path(spec.origin)
    if origin.name != "__init__.py":
        return [origin]
    return [p for p in sorted(origin.parent.rglob("*.py")) if not {"test", "tests", "idle_test"} & set(p.parts)]


def _sentences(doc: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in paragraph.splitlines()]
        if any(line.startswith((">>>", "...")) for line in lines):
            continue  # code, not prose
        for s in _SPLIT.split(" ".join(lines)):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s) / max(len(s), 1)
            if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and letters > 0.85:
                out.append(" ".join(words))
    return out


def _family_sentences(modules: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for module in modules:
        for path in _source_files(module):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue  # an unreadable source is skipped, the same way every run
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        found.update(_sentences(doc))
    return found


def examples() -> tuple[list[tuple[str, str]], str]:
    """(label, sentence) pairs in a fixed order, and a note saying what they are."""
    per_family = {family: _family_sentences(modules) for family, modules in FAMILIES.items()}
    seen: dict[str, int] = {}
    for sentences in per_family.values():
        for s in sentences:
            seen[s] = seen.get(s, 0) + 1
    pairs = []
    for family, sentences in per_family.items():
        unique = sorted(s for s in sentences if seen[s] == 1)
        chosen = random.Random(SEED).sample(unique, min(PER_CLASS, len(unique)))
        pairs += [(family, s) for s in sorted(chosen)]
    version = ".".join(map(str, sys.version_info[:3]))
    note = (f"{NAME}: {len(pairs)} sentences from the docstrings of Python {version}'s standard library, labelled by "
            f"module family ({', '.join(FAMILIES)}; at most {PER_CLASS} each)")
    return pairs, note
