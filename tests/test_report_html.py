"""report.html: one embedded PNG per expected plot, the same bytes on disk, sections only for the
documents given, and measured/derived labels taken from the reports' `sources`."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from wasi_compress.errors import UserError
from wasi_compress.report_html import write_report

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL_PLOTS = ["analyze-energy.png", "analyze-memory.png", "convert-ranks.png", "convert-pareto.png",
             "finetune-memory.png", "finetune-epochs.png"]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


class _Page(HTMLParser):
    """The images (their attributes), headings and summary-table text of a report."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.headings: list[str] = []
        self.badges: list[str] = []
        self._capture: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag in ("h2", "h3"):
            self._capture = self.headings
            self.headings.append("")
        elif tag == "span" and "source" in attrs.get("class", ""):
            self._capture = self.badges
            self.badges.append("")

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "span"):
            self._capture = None

    def handle_data(self, data):
        if self._capture is not None:
            self._capture[-1] += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def embedded_png(image: dict) -> bytes:
    prefix = "data:image/png;base64,"
    assert image["src"].startswith(prefix)
    data = base64.b64decode(image["src"][len(prefix):], validate=True)
    assert data
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG"
        decoded.verify()
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.width > 200 and decoded.height > 100
    return data


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    path = write_report(directory, analyze=fixture("analyze"), convert=fixture("convert"), finetune=fixture("finetune"))
    return directory, path


def test_every_plot_is_embedded_and_written(full_report):
    directory, path = full_report
    assert path == directory / "report.html"
    page = parse(path)
    assert [image["data-file"] for image in page.images] == ALL_PLOTS
    for image in page.images:
        assert embedded_png(image) == (directory / image["data-file"]).read_bytes()
        assert image["alt"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(ALL_PLOTS + ["report.html"])  # no temp files


def test_summary_says_measured_or_derived_where_sources_do(full_report):
    _, path = full_report
    page = parse(path)
    text = path.read_text(encoding="utf-8")
    assert "Summary" in page.headings
    # analyze: train_memory.sources says total derived, saved activations measured
    assert "derived" in page.badges and "measured" in page.badges
    assert "derived: linear weights + saved linear inputs" in page.badges  # finetune paper scope, as written
    # the memory legends carry it into the plots' captions too
    assert "which parts were measured and which derived" in text


def test_sections_only_for_the_documents_given(tmp_path):
    path = write_report(tmp_path, convert=fixture("convert"))
    page = parse(path)
    assert [image["data-file"] for image in page.images] == ["convert-ranks.png", "convert-pareto.png"]
    for image in page.images:
        embedded_png(image)
    assert not any(h.startswith(("Analysis", "Fine-tuning")) for h in page.headings)
    assert any(h.startswith("Conversion of tiny_vit.safetensors") for h in page.headings)


def test_missing_optional_parts_are_noted_not_drawn(tmp_path):
    convert = fixture("convert")
    convert["pareto"] = []
    convert["model"] = "<script>alert(1)</script>"
    for layer in convert["layers"]:  # names without blocks.N: bars instead of a heatmap
        layer["name"] = layer["name"].replace("blocks.", "stage")
    finetune = fixture("finetune")
    finetune["epochs"] = []
    path = write_report(tmp_path, convert=convert, finetune=finetune)
    page = parse(path)
    assert [image["data-file"] for image in page.images] == ["convert-ranks.png", "finetune-memory.png"]
    text = path.read_text(encoding="utf-8")
    assert "no Pareto sweep" in text and "no epochs" in text
    assert "<script>" not in text


@pytest.mark.parametrize("kwargs, message", [
    ({}, "at least one"),
    ({"analyze": fixture("convert")}, "wasi-compress/analyze/1"),
    ({"finetune": {"schema": "wasi-compress/finetune/2"}}, "wasi-compress/finetune/1"),
])
def test_bad_input(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        write_report(tmp_path, **kwargs)
    assert not (tmp_path / "report.html").exists()


def test_badge_kind_comes_from_source_kinds_not_the_prose(tmp_path):
    analyze = fixture("analyze")
    memory = analyze["totals"]["train_memory"]
    memory["sources"]["total_bytes"] = "measured: prose that says measured"
    analyze["source_kinds"] = {"totals.train_memory.total_bytes": "derived",
                               "totals.train_memory.saved_activation_bytes": "measured"}
    text = write_report(tmp_path, analyze=analyze).read_text(encoding="utf-8")
    assert "<span class='source derived' title='measured: prose that says measured'>" in text
    assert "<span class='source measured' title='measured: prose that says measured'>" not in text


def test_documents_without_source_kinds_fall_back_to_the_prose(tmp_path):
    analyze = fixture("analyze")
    analyze.pop("source_kinds", None)
    analyze["totals"]["train_memory"]["sources"]["total_bytes"] = "measured: an old document's prose"
    text = write_report(tmp_path, analyze=analyze).read_text(encoding="utf-8")
    assert "<span class='source measured' title='measured: an old document&#x27;s prose'>" in text


def test_a_figure_without_a_kind_in_source_kinds_is_not_classified_by_its_prose(tmp_path):
    finetune = fixture("finetune")
    finetune["sources"] = {**finetune.get("sources", {}), "final.accuracy": "measured: on held-out images"}
    finetune["source_kinds"] = {}
    text = write_report(tmp_path, finetune=finetune).read_text(encoding="utf-8")
    assert "<span class='source other' title='measured: on held-out images'>" in text


def test_report_documents_are_typed_and_validate_their_schema():
    from wasi_compress.reports import (ANALYZE_SCHEMA, ConvertReport, FinetuneReport, Source, with_source_kinds)

    doc = ConvertReport({"total_bytes": 10}, {"total_bytes": Source("derived", "sum of the weights")},
                        {"accuracy.converted": "measured"}).to_dict()
    assert doc == {"schema": "wasi-compress/convert/1", "total_bytes": 10,
                   "sources": {"total_bytes": "derived: sum of the weights"},
                   "source_kinds": {"total_bytes": "derived", "accuracy.converted": "measured"}}
    assert ConvertReport.from_dict(doc).to_dict() == doc
    with pytest.raises(UserError, match="expected a wasi-compress/finetune/1 document, got schema 'wasi-compress/convert/1'"):
        FinetuneReport.from_dict(doc)
    with pytest.raises(ValueError, match="Source.kind must be one of measured, derived, counted"):
        Source("guessed", "by eye")
    plain = {"schema": ANALYZE_SCHEMA, "sources": {"a": Source("counted", "by fvcore"), "b": "see elsewhere"}}
    assert with_source_kinds(plain, {"c.d": "measured"}) == {
        "schema": ANALYZE_SCHEMA, "sources": {"a": "counted: by fvcore", "b": "see elsewhere"},
        "source_kinds": {"a": "counted", "c.d": "measured"}}
