"""`hat report` and the report `hat run` ends with: one self-contained HTML page of a run.

One real `hat run` of the tiny recipe (about 15 s) feeds most tests; copies of its folder get
a fitted error in perf.json, markup in their files, or debug findings. A run with only float
trained and an empty run folder check the partial pages, and headless Chromium checks that the
page renders with no console error.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

from hatcli.main import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

ERROR = {"method": "leave one model family out", "rows": 87, "families": 9, "median_abs_error": 0.09,
         "within_10": 0.55, "within_25": 0.8, "spearman": 0.93, "data": "board measurements"}
MARKUP = "<script>alert(1)</script>"


def _recipe(folder: Path, data: Path, extra: str = "") -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(work=folder / "runs", data=data) + extra)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    """The tiny recipe after one whole `hat run` (its report included)."""
    recipe = _recipe(tmp_path_factory.mktemp("report_run"), tiny_shapes)
    assert run_cli(["run", str(recipe), "--json"]) == 0
    return recipe


def _copy_run(full_run: Path, tmp_path: Path, tiny_shapes: Path, extra: str = "") -> tuple[Path, Path]:
    """A copy of the whole run's folder under `tmp_path`, and a recipe that points at it."""
    shutil.copytree(full_run.parent / "runs", tmp_path / "runs")
    (tmp_path / "runs" / "tiny" / "report.html").unlink()
    return _recipe(tmp_path, tiny_shapes, extra), tmp_path / "runs" / "tiny"


def _page(recipe: Path) -> str:
    return (recipe.parent / "runs" / "tiny" / "report.html").read_text(encoding="utf-8")


def test_hat_run_ends_with_a_report_of_every_stage(full_run):
    page = _page(full_run)
    assert len(page.encode()) < 2_000_000
    table = page[page.index('<table class="stages">'):]
    table = table[:table.index("</table>")]
    for stage in ("pack", "float", "calibration", "qat", "int_infer", "export", "check (nash_e)",
                  "compile (nash_e -O3)", "perf", "deploy"):
        assert f"<td>{html.escape(stage)}</td>" in table, stage
    # one chart per stage with metrics: float and qat train epochs, calibration has none
    assert re.findall(r'<svg class="chart" data-chart="([^"]+)"', page) == ["float curves", "qat curves"]
    assert "calibration trains no epochs" in page
    assert "hat check" in page and "No layer falls back to the CPU." in page
    assert "nash_e-O3 (Journey 6E)" in page and "every layer (" in page
    assert page.count('src="data:image/jpeg;base64,') == 6 and "<b>deploy</b> model" in page
    assert "run `hat debug" in html.unescape(page)
    text = html.unescape(page)
    assert 'task = "tiny"' in text and "[quant]" in text and 'march = "nash_e"' in text  # the resolved recipe
    for name in ("hat", "torch", "torchao", "onnxruntime", "python"):
        assert f"<td>{name}</td>" in page
    assert "git commit of the working folder" in page


def test_the_page_makes_no_network_reference(full_run):
    page = _page(full_run)
    for attribute in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page, flags=re.I):
        assert not re.match(r"\s*(https?:)?//", attribute, flags=re.I), attribute
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page


def test_hat_report_writes_elsewhere_and_prints_a_json_summary(hat, full_run, tmp_path):
    out = tmp_path / "mail" / "report.html"
    result = hat("report", full_run, "--out", out, "--images", "2", "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["present"] == ["stages", "curves", "quantization", "perf", "predictions"]
    assert list(summary["missing"]) == ["debug"] and "hat debug" in summary["missing"]["debug"]
    assert out.read_text().count('src="data:image/jpeg;base64,') == 2
    plain = hat("report", full_run, "--images", "0", "--out", tmp_path / "plain.html")
    assert plain.code == 0, plain.err
    assert "wrote" in plain.out and "predictions: no pictures drawn" in plain.out
    folder = hat("report", full_run, "--out", tmp_path)
    assert folder.code == 2 and "is a folder" in folder.err


def test_a_fitted_estimate_shows_its_error_phrase_and_band(hat, full_run, tmp_path, tiny_shapes):
    recipe, run = _copy_run(full_run, tmp_path, tiny_shapes)
    perf_path = run / "compile" / "nash_e-O3" / "perf.json"
    perf = json.loads(perf_path.read_text())
    perf["estimate"].update(latency_ms=2.0, error=ERROR, extrapolated=True, extrapolation=["dense_gmac 3x"])
    perf_path.write_text(json.dumps(perf))
    assert hat("report", recipe, "--images", "0").code == 0
    text = " ".join(html.unescape(_page(recipe)).split())
    assert "2.000 ms, estimated: median error 9 % on 87 measured models" in text
    assert "leave one model family out; 55 % within +-10 %, 80 % within +-25 %" in text
    assert "band +-9 % (the median error): 1.820 to 2.180 ms" in text
    assert "extrapolated: dense_gmac 3x" in text and 'class="band"' in _page(recipe)


def test_an_estimate_never_checked_on_the_chip_says_so_without_a_band():
    from hatcli.workflows.report import estimate_words

    unchecked = {"method": "carried", "rows": 0, "data": "nash_e's fit, MAC terms x 80/128"}
    words = estimate_words({"latency_ms": 1.5, "estimated": True, "error": unchecked})
    assert words["headline"] == ("1.500 ms, estimated: not checked against any measured model "
                                 "(nash_e's fit, MAC terms x 80/128)")
    assert words["band"] == "" and words["low_ms"] is None
    roofline = estimate_words({"latency_ms": 0.5, "estimated": True, "error": None})
    assert "roofline cost model" in roofline["headline"] and "no error band" in roofline["headline"]


def test_text_from_recipes_and_run_files_is_escaped(hat, full_run, tmp_path, tiny_shapes):
    recipe, run = _copy_run(full_run, tmp_path, tiny_shapes)
    recipe.write_text(recipe.read_text().replace(f'root = "{tiny_shapes}"', f'root = "{tiny_shapes}{MARKUP}"'))
    with (run / "float" / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"epoch": 3, "loss": 0.5, MARKUP: 1.0}) + "\nnot json " + MARKUP + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary[1]["metric"] = MARKUP
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "debug").mkdir()
    (run / "debug" / "debug.json").write_text(json.dumps({"layers": [{"name": MARKUP, "drop": 1.5}]}))
    result = hat("report", recipe, "--images", "1")
    assert result.code == 0, result.err
    page = _page(recipe)
    assert MARKUP not in page and "<script" not in page.lower()
    escaped = html.escape(MARKUP, quote=False)
    assert page.count(escaped) >= 4  # the recipe, the stage table, the chart legend, the debug table
    assert "1 line(s) of" in page and "were not JSON records" in page


def test_debug_findings_are_shown_generically_and_an_empty_run_says_what_is_missing(hat, tmp_path, tiny_shapes):
    recipe = _recipe(tmp_path, tiny_shapes)
    debug = tmp_path / "runs" / "tiny" / "debug"
    debug.mkdir(parents=True)
    (debug / "debug.json").write_text(json.dumps({
        "layers": [{"module": "features.1", "drop": 2.5}, {"module": "fc", "drop": 0.1, "why": "int16 helps"}],
        "summary": {"worst": "features.1"}, "march": "nash_e"}))
    result = hat("report", recipe, "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["present"] == ["debug"]
    assert set(summary["missing"]) == {"stages", "curves", "quantization", "perf", "predictions"}
    page = _page(recipe)
    assert "<th>module</th><th>drop</th><th>why</th>" in page and "<td>int16 helps</td>" in page
    assert "<td>worst</td><td>features.1</td>" in page and "<p>nash_e</p>" in page
    text = html.unescape(page)
    assert f"float has not run: `hat train {recipe} --stage float` runs it." in text
    assert f"not compiled yet: `hat compile {recipe}`" in text


def test_a_run_with_only_float_trained_renders_what_it_has(hat, tmp_path, tiny_shapes):
    recipe = _recipe(tmp_path, tiny_shapes)
    recipe.write_text(recipe.read_text().replace("epochs = 2", "epochs = 1", 1))
    assert hat("train", recipe, "--stage", "float").code == 0
    result = hat("report", recipe, "--images", "2", "--json")
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["present"] == ["stages", "curves", "predictions"]
    assert set(summary["missing"]) == {"quantization", "perf", "debug"}
    assert "hat export" in summary["missing"]["quantization"]
    page = _page(recipe)
    assert re.findall(r'data-chart="([^"]+ curves)"', page) == ["float curves"]
    assert "<b>float</b> model" in page and "no summary.json" in page
    assert "calibration has not run" in page and "qat has not run" in page


def test_a_recipe_without_a_run_folder_is_a_usage_error_naming_the_command(hat, tiny_recipe):
    result = hat("report", tiny_recipe)
    assert result.code == 2
    assert "no run folder at" in result.err and f"hat run {tiny_recipe}" in " ".join(result.err.split())
    assert "Traceback" not in result.err


def _browser():
    """Headless Chromium through chromedriver (Debian's packages), its console log kept."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost"):
        options.add_argument(argument)  # any request off the page would fail, and log an error
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_report_renders_in_a_real_browser_without_console_errors(full_run):
    page = full_run.parent / "runs" / "tiny" / "report.html"
    browser = _browser()
    try:
        browser.get(page.resolve().as_uri())
        assert browser.title == "hat report: tiny"
        charts = browser.execute_script(
            "return [...document.querySelectorAll('svg.chart')].map(s => [s.getBoundingClientRect().width,"
            " s.getBoundingClientRect().height, s.querySelectorAll('polyline, circle').length])")
        assert len(charts) == 2 and all(w > 100 and h > 100 and marks > 0 for w, h, marks in charts), charts
        rows = browser.execute_script("return document.querySelectorAll('table.stages tr').length")
        assert rows == 11  # the header and the ten stages of `hat run`
        tables = browser.execute_script("return document.querySelectorAll('table').length")
        assert tables >= 4  # stages, quantization facts, every layer, versions
        pictures = browser.execute_script(
            "return [...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert pictures == [True] * 6
        log = browser.get_log("browser")
    finally:
        browser.quit()
    assert [entry for entry in log if entry["level"] == "SEVERE"] == [], log


def test_the_git_commit_is_the_working_folders_or_unknown(tmp_path):
    from hatcli.workflows.report_extras import git_commit

    assert git_commit(tmp_path) == "unknown"  # not a repository
    if not shutil.which("git"):
        pytest.skip("no git on PATH")
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit(tmp_path))
    (tmp_path / "a.txt").write_text("b")
    assert git_commit(tmp_path).endswith(" (uncommitted changes)")
