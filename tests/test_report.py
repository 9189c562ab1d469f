"""The report of the session's pipeline run, opened in a real headless browser (Debian's chromium through its
chromedriver, which `make test` installs when missing): every image loads, and every number the page takes from
MLflow equals MLflow's. A workspace where only some stages ran gets a report of what is there."""
from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from td_ray import tracking
from td_ray.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (`make test` installs them: apt-get install "
                    "chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, page: Path) -> None:
    browser.get(page.as_uri())
    browser.execute_async_script(  # wait until every image has loaded or failed
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? null :"
        " new Promise(r => { i.onload = r; i.onerror = r; }))).then(() => done(null));")


def test_the_report_loads_with_every_image_and_mlflows_numbers(pipeline_run, browser):
    config, results = pipeline_run
    page = Path(config.workspace) / "report" / "report.html"
    _open(browser, page)
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")
    assert sorted(src for src, _ in images) == ["per_query.png", "teacher_scores.png", "training.png"]
    assert all(loaded for _, loaded in images), images
    assert not browser.execute_script(  # self-contained: nothing but the page's own folder is referenced
        "return Array.from(document.querySelectorAll('[src],link[href]')).filter(e => "
        "(e.src || e.href).startsWith('http')).length;")

    client = mlflow.MlflowClient(tracking.tracking_uri(config))
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-metric]')).map(c => "
        "[c.dataset.run, c.dataset.metric, c.dataset.value, c.textContent]);")
    checked = set()
    for run_id, metric, value, text in cells:
        logged = client.get_run(run_id).data.metrics[metric]
        assert float(value) == logged, (metric, run_id)
        checked.add((client.get_run(run_id).info.run_name, metric))
        if metric.startswith(("nDCG", "R_", "RR", "bm25_")):
            assert text == f"{logged:,.4f}"
    for stage in ("translate", "score", "distill", "index", "evaluate", "index (untrained)", "evaluate (untrained)"):
        assert (stage, "seconds") in checked and (stage, "cpu_seconds") in checked, stage
    assert {("evaluate", "nDCG_20"), ("evaluate (untrained)", "nDCG_20"), ("evaluate", "bm25_nDCG_20")} <= checked
    assert {("score", "cpu_hours"), ("score", "cost"), ("distill", "gpu_hours")} <= checked
    # the evaluation table holds the stage's results, before and after training
    table = browser.execute_script(
        "return Array.from(document.querySelectorAll('#evaluation tr')).slice(1).map(r => "
        "Array.from(r.cells).map(c => c.textContent));")
    assert [row[0] for row in table] == ["student, trained", "student, untrained", "BM25 (no student)"]
    assert float(table[0][1]) == pytest.approx(results["evaluate"].metrics["nDCG@20"], abs=5e-5)
    assert float(table[1][1]) == pytest.approx(results["evaluate (untrained)"].metrics["nDCG@20"], abs=5e-5)
    text = browser.find_element("tag name", "body").text
    assert "models:/td-ray-student/" in text and "config hash" in text and "passages → qaa" in text
    # the reference job, projected from this run's rates, which were measured on CPUs and say so
    assert "Projected: the reference job" in text and "not GPU figures" in text
    for stage, work in (("score", "26,500,000 teacher pairs"), ("distill", "200,000 steps")):
        assert work in text, stage
    # the whole report is an artifact of the pipeline's MLflow run
    parent = client.search_runs([client.get_experiment_by_name("td-ray").experiment_id],
                                "attributes.run_name = 'pipeline'")[-1]
    logged = {Path(item.path).name for item in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.html", "per_query.png", "teacher_scores.png", "training.png"} <= logged


def test_a_workspace_without_runs_gets_a_report_that_says_so(tmp_path, browser):
    page = Path(write_report(str(tmp_path), f"sqlite:///{tmp_path}/mlflow.db"))
    _open(browser, page)
    text = browser.find_element("tag name", "body").text
    assert "No stage has run in this workspace." in text and "No evaluation" in text
    assert not browser.execute_script("return document.images.length;")
