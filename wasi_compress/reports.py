"""Report documents, typed: the schema strings (defined only here), each figure's `Source` as data, and
thin typed wrappers (`AnalyzeReport`, `ConvertReport`, `FinetuneReport`) around the JSON documents of
docs/schemas.md.

A document's JSON keeps its `sources` dict of prose exactly as before ("derived: ...", "measured by ...")
and gains `source_kinds`: the same keys (and, for figures whose prose sits beside the figure, such as
analyze's `totals.train_memory.sources`, the figure's dotted path) mapped to "measured", "derived" or
"counted". Readers take the kind from `source_kinds`; only documents written before it existed fall back
to the prose's first word (`kind_of_prose`). This module imports neither torch nor the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from wasi_compress.errors import UserError

__all__ = ["ANALYZE_SCHEMA", "CHECK_SCHEMA", "CONVERT_SCHEMA", "FINETUNE_SCHEMA", "KINDS", "REPORT_SCHEMAS",
           "AnalyzeReport", "ConvertReport", "FinetuneReport", "Report", "Source", "kind_of_prose",
           "source_fields", "with_source_kinds"]

ANALYZE_SCHEMA = "wasi-compress/analyze/1"
CONVERT_SCHEMA = "wasi-compress/convert/1"
FINETUNE_SCHEMA = "wasi-compress/finetune/1"
CHECK_SCHEMA = "wasi-compress/check/1"
REPORT_SCHEMAS = (ANALYZE_SCHEMA, CONVERT_SCHEMA, FINETUNE_SCHEMA)
KINDS = ("measured", "derived", "counted")


@dataclass(frozen=True)
class Source:
    """Where a figure comes from: ``kind`` (measured from a real run, derived from tensor sizes by a
    stated formula, or counted) and ``how`` (prose). ``text`` is the prose the JSON's `sources` holds:
    ``"kind: how"``, or ``prose`` verbatim where a document has always worded it otherwise."""

    kind: str
    how: str
    prose: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Source.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def text(self) -> str:
        return self.prose if self.prose is not None else f"{self.kind}: {self.how}"

    @classmethod
    def worded(cls, kind: str, prose: str) -> Source:
        """A source whose prose is kept exactly as written (e.g. "measured by fvcore on the example batch")."""
        return cls(kind, prose, prose)


def kind_of_prose(text: str) -> str:
    """The kind a prose source names by its first word, or "" (for documents without `source_kinds`)."""
    word = text.split(":")[0].split()[0].lower() if text.strip() else ""
    return word if word in KINDS else ""


def source_fields(sources: Mapping[str, Source | str], extra_kinds: Mapping[str, Source | str] | None = None
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """(`sources`, `source_kinds`) for a document: prose for every entry (a plain string is a note, such
    as "see train_memory.sources", and has no kind), kinds for every Source. ``extra_kinds`` adds kinds
    only (a Source or a kind string), for figures whose prose lives beside the figure."""
    prose = {k: (s.text if isinstance(s, Source) else str(s)) for k, s in sources.items()}
    kinds = {k: s.kind for k, s in sources.items() if isinstance(s, Source)}
    for k, s in (extra_kinds or {}).items():
        kind = s.kind if isinstance(s, Source) else str(s)
        if kind not in KINDS:
            raise ValueError(f"source kind for {k} must be one of {', '.join(KINDS)}, got {kind!r}")
        kinds[k] = kind
    return prose, kinds


def with_source_kinds(doc: dict[str, Any], kinds: Mapping[str, Source | str] | None = None) -> dict[str, Any]:
    """Give a plain document its `source_kinds` (in place; returned too). Values of `doc["sources"]` may
    be `Source`s (they become their prose) or prose strings; ``kinds`` adds or overrides kinds by key or
    dotted path. Without ``kinds``, prose strings get no kind unless they are Sources."""
    prose, found = source_fields(doc.get("sources") or {}, kinds)
    if "sources" in doc:
        doc["sources"] = prose
    doc["source_kinds"] = {**doc.get("source_kinds", {}), **found}
    return doc


@dataclass
class Report:
    """A report document: its figures (``body``, the JSON keys other than schema, sources and
    source_kinds, in order) and each figure's source. ``to_dict()`` writes the JSON document;
    ``from_dict()`` reads one, refusing another schema."""

    SCHEMA: ClassVar[str] = ""
    body: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Source | str] = field(default_factory=dict)
    extra_kinds: dict[str, Source | str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        prose, kinds = source_fields(self.sources, self.extra_kinds)
        return {"schema": self.SCHEMA, **self.body, "sources": prose, "source_kinds": kinds}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Report:
        if doc.get("schema") != cls.SCHEMA:
            raise UserError(f"expected a {cls.SCHEMA} document, got schema {doc.get('schema')!r}")
        body = {k: v for k, v in doc.items() if k not in ("schema", "sources", "source_kinds")}
        kinds = doc.get("source_kinds")
        sources: dict[str, Source | str] = {}
        for k, text in (doc.get("sources") or {}).items():
            kind = kinds.get(k, "") if isinstance(kinds, dict) else kind_of_prose(str(text))
            sources[k] = Source.worded(kind, str(text)) if kind in KINDS else str(text)
        extra = {k: v for k, v in (kinds or {}).items() if k not in sources and v in KINDS}
        return cls(body, sources, extra)

    def kind(self, key: str) -> str:
        """The kind of the figure at ``key`` (a `sources` key or dotted path), or ""."""
        return self.to_dict()["source_kinds"].get(key, "")


@dataclass
class AnalyzeReport(Report):
    SCHEMA: ClassVar[str] = ANALYZE_SCHEMA


@dataclass
class ConvertReport(Report):
    SCHEMA: ClassVar[str] = CONVERT_SCHEMA


@dataclass
class FinetuneReport(Report):
    SCHEMA: ClassVar[str] = FINETUNE_SCHEMA
