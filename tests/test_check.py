"""`wasi-compress check`: gates over hand-written reports (tests/fixtures), exit codes, configuration
files, and the JUnit, Markdown and JSON outputs; plus the commands of examples/ci run as written."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from wasi_compress import gates
from wasi_compress.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLES = ROOT / "examples" / "ci"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory, so no wasi-compress.toml or pyproject.toml of the repository is found."""
    (tmp_path / ".git").mkdir()  # stops the configuration search here
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def check(*args: str):
    return CliRunner().invoke(main, ["check", *map(str, args)])


# --------------------------------------------------------------------------------------------------
# Gates and exit codes

def test_every_gate_passes_on_a_convert_report(workdir):
    result = check(FIXTURES / "convert.json", "--max-size", "20KB", "--max-params", "5K", "--max-flops", "1M",
                   "--min-accuracy", "0.9", "--max-onnx-diff", "1e-5")
    assert result.exit_code == 0, result.output
    for name in ("max-size", "max-params", "max-flops", "min-accuracy", "max-onnx-diff"):
        assert name in result.output
    assert "5 of 5 gates pass" in result.output


def test_a_failing_gate_exits_1_and_says_which(workdir):
    result = check(FIXTURES / "convert.json", "--max-size", "19KB", "--min-accuracy", "90%", "--json", "out.json")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "1 of 2 gates pass" in result.output
    document = json.loads((workdir / "out.json").read_text())
    assert document["schema"] == "wasi-compress/check/1" and document["passed"] is False
    by_name = {g["name"]: g for g in document["gates"]}
    assert (by_name["max-size"]["actual"], by_name["max-size"]["limit"], by_name["max-size"]["passed"]) == (19752, 19000, False)
    assert by_name["min-accuracy"]["passed"] is True and by_name["min-accuracy"]["limit"] == pytest.approx(0.9)


@pytest.mark.parametrize("report, option, limit, key", [
    ("analyze", "--max-size", "31400B", "totals.weight_bytes"),
    ("analyze", "--max-params", "7850", "totals.params"),
    ("analyze", "--max-flops", "1139584", "totals.flops"),
    ("analyze", "--max-train-memory", "537760", "totals.train_memory.total_bytes"),
    ("convert", "--max-size", "19752", "total_bytes"),
    ("convert", "--max-params", "4938", "params.converted"),
    ("convert", "--max-flops", "743552", "flops.converted"),
    ("convert", "--min-accuracy", "0.904", "accuracy.converted"),
    ("convert", "--max-onnx-diff", "2.384e-06", "onnx.max_abs_diff"),
    ("finetune", "--max-size", "19752", "memory.params_bytes"),
    ("finetune", "--max-train-memory", "324768", "memory.peak_bytes"),
    ("finetune", "--min-accuracy", "0.909", "final.accuracy"),
])
def test_figure_lookup_per_report_kind(workdir, report, option, limit, key):
    """Each figure is read from the key docs/schemas.md gives it; a limit equal to the figure passes."""
    result = check(FIXTURES / f"{report}.json", option, limit, "--json", "out.json")
    assert result.exit_code == 0, result.output
    (gate,) = json.loads((workdir / "out.json").read_text())["gates"]
    assert gate["key"] == key and gate["passed"]


def test_a_gate_the_report_cannot_answer_is_an_error(workdir):
    result = check(FIXTURES / "analyze.json", "--max-size", "1MB", "--max-onnx-diff", "1e-4")
    assert result.exit_code == 2
    assert "max-onnx-diff" in result.output and "onnx.max_abs_diff" in result.output
    assert "Traceback" not in result.output


def test_a_missing_key_is_an_error_naming_gate_and_key(workdir):
    report = fixture("convert")
    del report["accuracy"]
    result = check(write(workdir / "c.json", report), "--min-accuracy", "0.5")
    assert result.exit_code == 2
    assert "min-accuracy" in result.output and "accuracy.converted" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_nan_fails_the_gate(workdir):
    report = fixture("convert")
    report["onnx"]["max_abs_diff"] = float("nan")
    assert check(write(workdir / "c.json", report), "--max-onnx-diff", "1").exit_code == 1


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a wasi-compress report"),
    ('{"model": "x"}', "no \"schema\""),
    ('{"schema": "wasi-compress/convert/9"}', "unknown schema"),
    ('{"schema": "wasi-compress/check/1"}', "unknown schema"),
])
def test_malformed_reports_are_one_line_exit_2(workdir, content, message):
    result = check(write(workdir / "r.json", content), "--max-size", "1MB")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    ([], "no gates given"),
    (["--max-size", "fifty"], "--max-size"),
    (["--min-accuracy", "75"], "fraction"),
    (["--max-params", "-3"], "--max-params"),
    (["--baseline", str(FIXTURES / "convert.json")], "go together"),
    (["--max-regression", "5"], "go together"),
])
def test_bad_usage_exits_2(workdir, args, message):
    result = check(FIXTURES / "convert.json", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_a_missing_json_report_is_not_taken_for_a_model(workdir):
    result = check(workdir / "typo.json", "--max-size", "1MB")
    assert result.exit_code == 2 and "report not found" in result.output


def test_a_model_target_is_analyzed(workdir, monkeypatch):
    calls = []

    def analyze_model(spec: str, batch_size: int = 8) -> dict:
        calls.append((spec, batch_size))
        return fixture("analyze")

    monkeypatch.setitem(sys.modules, "wasi_compress.analysis", types.SimpleNamespace(analyze_model=analyze_model))
    result = check("builtin:mnist-vit", "--batch-size", "4", "--max-params", "10K")
    assert result.exit_code == 0, result.output
    assert calls == [("builtin:mnist-vit", 4)]


# --------------------------------------------------------------------------------------------------
# Baseline regressions

def test_regression_against_a_baseline(workdir):
    baseline = fixture("convert")
    baseline["total_bytes"] = 19000  # the new model is 3.96% larger
    baseline["accuracy"]["converted"] = 0.91  # and 0.66% less accurate, relative
    write(workdir / "base.json", baseline)
    passing = check(FIXTURES / "convert.json", "--baseline", "base.json", "--max-regression", "4", "--json", "p.json")
    assert passing.exit_code == 0, passing.output
    gates_ = {g["name"]: g for g in json.loads((workdir / "p.json").read_text())["gates"]}
    assert gates_["size-regression"]["limit"] == pytest.approx(19000 * 1.04)
    assert gates_["size-regression"]["baseline"] == 19000
    assert gates_["accuracy-regression"]["limit"] == pytest.approx(0.91 * 0.96)
    failing = check(FIXTURES / "convert.json", "--baseline", "base.json", "--max-regression", "3")
    assert failing.exit_code == 1
    accuracy_only = check(FIXTURES / "convert.json", "--baseline", "base.json", "--max-regression", "0.5")
    assert accuracy_only.exit_code == 1 and "accuracy-regression" in accuracy_only.output


def test_regression_notes_figures_one_kind_cannot_record(workdir):
    """An analyze baseline has train memory, which a convert report never records: noted, not an error."""
    result = check(FIXTURES / "convert.json", "--baseline", FIXTURES / "analyze.json", "--max-regression", "0",
                   "--json", "c.json")
    assert result.exit_code == 0, result.output
    document = json.loads((workdir / "c.json").read_text())
    assert [g["name"] for g in document["gates"]] == ["size-regression"]
    assert any("train-memory-regression not checked" in note for note in document["notes"])


def test_regression_on_a_figure_the_report_lost_is_an_error(workdir):
    report = fixture("convert")
    del report["accuracy"]
    result = check(write(workdir / "c.json", report), "--baseline", FIXTURES / "convert.json", "--max-regression", "1")
    assert result.exit_code == 2 and "accuracy-regression" in result.output


# --------------------------------------------------------------------------------------------------
# Configuration files

def test_gates_from_wasi_compress_toml_in_a_parent_folder(workdir, monkeypatch):
    write(workdir / "wasi-compress.toml", '[gates]\nmax-size = "20KB"\nbaseline = "ci/base.json"\nmax-regression = 1\n')
    write(workdir / "ci" / "base.json", fixture("convert"))
    (workdir / "sub").mkdir()
    monkeypatch.chdir(workdir / "sub")
    result = check(FIXTURES / "convert.json", "--json", "c.json")
    assert result.exit_code == 0, result.output
    names = [g["name"] for g in json.loads((workdir / "sub" / "c.json").read_text())["gates"]]
    assert names == ["max-size", "size-regression", "accuracy-regression"]


def test_gates_from_pyproject_and_the_command_line_overrides(workdir):
    write(workdir / "pyproject.toml", '[project]\nname = "x"\n\n[tool.wasi-compress.gates]\nmax-size = "19KB"\n'
                                      "min-accuracy = 0.9\n")
    assert check(FIXTURES / "convert.json").exit_code == 1  # 19.75 KB > 19 KB
    result = check(FIXTURES / "convert.json", "--max-size", "20KB", "--json", "c.json")
    assert result.exit_code == 0, result.output
    limits = {g["name"]: g["limit"] for g in json.loads((workdir / "c.json").read_text())["gates"]}
    assert limits == {"max-size": 20000, "min-accuracy": 0.9}


def test_pyproject_without_gates_is_passed_over(workdir):
    write(workdir / "pyproject.toml", '[project]\nname = "x"\n')
    assert gates.find_config(workdir) is None
    assert check(FIXTURES / "convert.json").exit_code == 2


def test_explicit_config_and_its_errors(workdir):
    config = write(workdir / "gates.toml", '[gates]\nmax-size = "20KB"\n')
    assert check(FIXTURES / "convert.json", "--config", config).exit_code == 0
    typo = write(workdir / "typo.toml", "[gates]\nmax_size = 5\n")
    result = check(FIXTURES / "convert.json", "--config", typo)
    assert result.exit_code == 2 and "max_size" in result.output
    empty = write(workdir / "empty.toml", "[other]\n")
    assert "no [gates] table" in check(FIXTURES / "convert.json", "--config", empty).output
    broken = write(workdir / "broken.toml", "[gates\n")
    assert "not valid TOML" in check(FIXTURES / "convert.json", "--config", broken).output


# --------------------------------------------------------------------------------------------------
# Outputs

def test_junit_markdown_and_json_outputs(workdir):
    result = check(FIXTURES / "finetune.json", "--max-train-memory", "300KB", "--min-accuracy", "0.9",
                   "--junit", "out/check.xml", "--markdown", "out/check.md", "--json", "out/check.json")
    assert result.exit_code == 1
    suites = ET.parse(workdir / "out" / "check.xml").getroot()
    cases = suites.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == ["max-train-memory", "min-accuracy"]
    assert suites.get("tests") == "2" and suites.get("failures") == "1"
    (failure,) = cases[0].findall("failure")
    assert "memory.peak_bytes" in failure.get("message") and cases[1].find("failure") is None
    markdown = (workdir / "out" / "check.md").read_text()
    assert "| max-train-memory | `memory.peak_bytes` | 324.77 KB | <= 300.00 KB | **FAIL** |" in markdown
    assert "| min-accuracy |" in markdown and "check failed: 1 of 2" in markdown
    document = json.loads((workdir / "out" / "check.json").read_text())
    assert [(g["name"], g["passed"]) for g in document["gates"]] == [("max-train-memory", False), ("min-accuracy", True)]
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["check.json", "check.md", "check.xml"]  # no temp files


def test_json_to_stdout_keeps_stdout_parseable(workdir):
    runner = CliRunner()
    result = runner.invoke(main, ["check", str(FIXTURES / "convert.json"), "--max-size", "20KB", "--json", "-"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True
    assert "max-size" in result.stderr


# --------------------------------------------------------------------------------------------------
# examples/ci: the commands the examples run, against fixture reports

def _prepare_example_tree(root: Path) -> None:
    """What the example CI jobs find after their convert step: out/convert.json, a committed baseline,
    and the example gates at their repository path."""
    write(root / "out" / "convert.json", fixture("convert"))
    write(root / "ci" / "baseline-convert.json", fixture("convert"))
    (root / "examples" / "ci").mkdir(parents=True)
    shutil.copy(EXAMPLES / "wasi-compress.toml", root / "examples" / "ci" / "wasi-compress.toml")


def _run_check_lines(lines: list[str]) -> list:
    checks = [shlex.split(line) for line in lines if line.strip().startswith("wasi-compress check")]
    assert checks, "the example runs no `wasi-compress check`"
    return [CliRunner().invoke(main, argv[1:]) for argv in checks]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_example(workdir):
    _prepare_example_tree(workdir)
    dry_run = subprocess.run(["make", "-n", "-f", str(EXAMPLES / "Makefile"), "gate"], cwd=workdir,
                             capture_output=True, text=True, check=True)
    lines = dry_run.stdout.splitlines()
    assert any(line.startswith("wasi-compress convert") and "out/convert.json" in line for line in lines)
    (result,) = _run_check_lines(lines)
    assert result.exit_code == 0, result.output
    assert "gates from examples/ci/wasi-compress.toml" in result.output
    assert ET.parse(workdir / "out" / "check.xml").getroot().get("failures") == "0"
    assert (workdir / "out" / "check.md").read_text().startswith("### wasi-compress check passed")


def test_github_actions_example(workdir):
    _prepare_example_tree(workdir)
    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    steps = workflow["jobs"]["gate"]["steps"]
    runs = [step["run"] for step in steps if "run" in step]
    (result,) = _run_check_lines([line for run in runs for line in run.splitlines()])
    assert result.exit_code == 0, result.output
    assert ET.parse(workdir / "out" / "check.xml").getroot().get("tests") == "4"
    summary_step = next(run for run in runs if "GITHUB_STEP_SUMMARY" in run)
    summary = workdir / "summary.md"
    subprocess.run(["bash", "-e", "-c", summary_step], cwd=workdir, check=True,
                   env={"GITHUB_STEP_SUMMARY": str(summary), "PATH": "/usr/bin:/bin"})
    assert "| size-regression |" in summary.read_text()
