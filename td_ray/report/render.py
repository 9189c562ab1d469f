"""The report as one self-contained HTML page (inline CSS, no script, no network) with its PNG plots beside it.

Every number taken from MLflow is printed with its exact value in a `data-value` attribute, so a reader (or a
test) can check the page against the tracking store.
"""
from __future__ import annotations

import html
import os
import uuid
from pathlib import Path

from td_ray.cost import project
from td_ray.report.collect import ReportData, StageRow
from td_ray.workspace import untrained_label

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.25em 0.8em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; } .missing { color: #888; font-style: italic; }
code { font-size: 0.9em; } img { max-width: 100%; border: 1px solid #eee; }
"""


def _escape(value: object) -> str:
    return html.escape(str(value))


def _number(value: float | None, digits: int = 1, metric: str | None = None, run: str | None = None) -> str:
    """A table cell holding `value` shown to `digits` decimals, its exact value in data-value."""
    if value is None:
        return "<td>&ndash;</td>"
    attributes = f' data-value="{value!r}"'
    if metric is not None:
        attributes += f' data-metric="{_escape(metric)}" data-run="{_escape(run)}"'
    return f"<td{attributes}>{value:,.{digits}f}</td>"


def _missing(what: str) -> str:
    return f'<p class="missing">{_escape(what)}</p>'


def _save_png(figure, directory: Path, name: str) -> str:
    """Save `figure` atomically as `directory/name`; returns the name (relative to the page)."""
    import matplotlib.pyplot as plt

    temporary = directory / f".{name}.{uuid.uuid4().hex}.tmp.png"
    try:
        figure.savefig(temporary, dpi=100, bbox_inches="tight")
        os.replace(temporary, directory / name)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return name


def _stage_table(stages: list[StageRow]) -> str:
    if not stages:
        return _missing("No stage has run in this workspace.")
    head = ("<tr><th>stage</th><th>rows</th><th>seconds</th><th>rows/s</th><th>tokens/s</th><th>CPU-seconds</th>"
            "<th>GPU-seconds</th><th>start-up s</th></tr>")
    body = []
    for row in stages:
        m = row.metrics
        body.append(
            f"<tr><td>{_escape(row.label)}</td>{_number(m.get('rows'), 0, 'rows', row.run_id)}"
            f"{_number(m.get('seconds'), 1, 'seconds', row.run_id)}{_number(m.get('rows_per_s'), 1, 'rows_per_s', row.run_id)}"
            f"{_number(row.tokens_per_s, 0)}{_number(m.get('cpu_seconds'), 1, 'cpu_seconds', row.run_id)}"
            f"{_number(m.get('gpu_seconds'), 1, 'gpu_seconds', row.run_id)}{_number(row.startup_seconds, 1)}</tr>")
    return ("<table>" + head + "".join(body) + "</table><p>CPU-seconds: the driver and the local Ray node's "
            "processes; GPU-seconds: GPUs reserved by the stage's tasks and actors. Start-up: to the first output "
            "row (distill: to the first optimizer step).</p>")


def _cost_section(data: ReportData) -> str:
    """This run's CPU- and GPU-hours and cost per stage, then the reference job projected from its measured rates."""
    prices = (data.config or {}).get("cost") or {}
    currency = _escape(prices.get("currency", "USD"))
    if not data.stages:
        return _missing("No stage has run in this workspace.")
    body = "".join(f"<tr><td>{_escape(row.label)}</td>{_number(row.metrics.get('cpu_hours'), 4, 'cpu_hours', row.run_id)}"
                   f"{_number(row.metrics.get('gpu_hours'), 4, 'gpu_hours', row.run_id)}"
                   f"{_number(row.metrics.get('cost'), 4, 'cost', row.run_id)}</tr>" for row in data.stages)
    table = (f"<table><tr><th>stage</th><th>CPU-hours</th><th>GPU-hours</th><th>cost ({currency})</th></tr>{body}"
             "</table>")
    if prices.get("cpu_hour") is None and prices.get("gpu_hour") is None:
        table += _missing("No prices in the config: set cost.cpu_hour and cost.gpu_hour to see costs.")
    projected = project(data.config or {}, {row.label: row.metrics for row in data.stages}, prices)
    if not projected:
        return table + _missing("No stage measured a rate in this run: nothing to project.")
    rows = "".join(
        f"<tr><td>{_escape(item.stage)}</td><td style='text-align:left'>{_escape(item.work)}</td>"
        f"{_number(item.rate, 2)}<td>{_escape(item.unit)}</td><td>{_escape(item.measured_on)}</td>"
        f"{_number(item.hours, 2)}{_number(item.cpu_hours, 1)}{_number(item.gpu_hours, 1)}{_number(item.cost, 2)}</tr>"
        for item in projected)
    on_cpu = any(item.measured_on == "CPU" for item in projected)
    return (table + "<h3>Projected: the reference job</h3><p>MS MARCO into one language, 200 k distillation steps, "
            "NeuCLIR Chinese indexed, at the rates this run measured with this run's pools. " +
            ("Rates measured on CPU project a CPU run: they are not GPU figures. " if on_cpu else "") +
            "</p><table><tr><th>stage</th><th>work</th><th>rate</th><th>unit</th><th>measured on</th><th>hours</th>"
            f"<th>CPU-hours</th><th>GPU-hours</th><th>cost ({currency})</th></tr>{rows}</table>")


def _qa_table(data: ReportData) -> str:
    if not data.qa_flags:
        return _missing("No translation in this workspace.")
    flags = sorted({flag for _, counts in data.qa_flags.values() for flag in counts} - {"(none)"}) + ["(none)"]
    head = "<tr><th>table</th><th>rows</th>" + "".join(f"<th>{_escape(flag)}</th>" for flag in flags) + "</tr>"
    body = [f"<tr><td>{_escape(kind)} &rarr; {_escape(lang)}</td>{_number(rows, 0)}"
            + "".join(_number(counts.get(flag, 0), 0) for flag in flags) + "</tr>"
            for (kind, lang), (rows, counts) in sorted(data.qa_flags.items(), key=lambda item: (item[0][1], item[0][0]))]
    return "<table>" + head + "".join(body) + "</table><p>(none): rows with no quality flag.</p>"


def _scores_section(data: ReportData, directory: Path) -> str:
    import matplotlib.pyplot as plt

    scores = data.scores
    if scores is None:
        return _missing("No teacher scores in this workspace.")
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.stairs(scores.counts, scores.edges, fill=True, alpha=0.7)
    axes.set_xlabel("teacher score (raw logit)")
    axes.set_ylabel("pairs")
    name = _save_png(figure, directory, "teacher_scores.png")
    return (f'<img src="{name}" alt="teacher score distribution"><p>{scores.count:,} scored pairs, mean '
            f"{scores.mean:.3f}, standard deviation {scores.std:.3f}; teacher: {_escape(', '.join(scores.teachers))}</p>")


def _training_section(data: ReportData, directory: Path) -> str:
    import matplotlib.pyplot as plt

    if not data.training.get("loss"):
        return _missing("No training history (the distill stage has not run here).")
    figure, (loss_axes, lr_axes) = plt.subplots(1, 2, figsize=(10, 3))
    steps, values = zip(*data.training["loss"])
    loss_axes.plot(steps, values)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    if data.training.get("lr"):
        steps, values = zip(*data.training["lr"])
        lr_axes.plot(steps, values, color="tab:orange")
    lr_axes.set_xlabel("step")
    lr_axes.set_ylabel("learning rate")
    name = _save_png(figure, directory, "training.png")
    first, last = data.training["loss"][0], data.training["loss"][-1]
    return (f'<img src="{name}" alt="training loss and learning rate"><p>loss {first[1]:.4f} at step {first[0]} '
            f"&rarr; {last[1]:.4f} at step {last[0]} (mean over the workers).</p>")


def _evaluation_section(data: ReportData, directory: Path) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    if not data.evaluation:
        return _missing("No evaluation (the evaluate stage has not run here).")
    runs = {"student, trained": data.stage("evaluate"), "student, untrained": data.stage(untrained_label("evaluate")),
            "BM25 (no student)": data.stage("evaluate")}
    head = "<tr><th>system</th>" + "".join(f"<th>{_escape(m)}</th>" for m in data.measures) + "</tr>"
    body = []
    for system, values in data.evaluation.items():
        prefix = "bm25_" if system.startswith("BM25") else ""
        run = runs[system]
        body.append(f"<tr><td>{_escape(system)}</td>" + "".join(
            _number(values.get(m), 4, prefix + m.replace("@", "_"), run.run_id if run else None) for m in data.measures)
            + "</tr>")
    section = '<table id="evaluation">' + head + "".join(body) + "</table>"
    if data.per_query:
        measure = data.measures[0]
        trained = data.per_query.get("student, trained", {})
        order = sorted(set().union(*data.per_query.values()), key=lambda qid: (-trained.get(qid, 0.0), qid))
        figure, axes = plt.subplots(figsize=(max(6, 0.35 * len(order)), 3.5))
        width = 0.8 / len(data.per_query)
        for i, (system, values) in enumerate(data.per_query.items()):
            axes.bar(np.arange(len(order)) + i * width, [values.get(qid, 0.0) for qid in order], width, label=system)
        axes.set_xticks(np.arange(len(order)) + 0.4 - width / 2, order, rotation=90, fontsize=7)
        axes.set_ylabel(measure)
        axes.legend()
        name = _save_png(figure, directory, "per_query.png")
        section += f'<img src="{name}" alt="per-query {_escape(measure)}"><p>{_escape(measure)} per topic.</p>'
    return section


def _outputs(data: ReportData) -> str:
    items = [f"<li>{_escape(row.label)}.{_escape(name)}: <code>{_escape(where)}</code></li>"
             for row in data.stages for name, where in row.outputs.items()]
    return "<ul>" + "".join(items) + "</ul>" if items else _missing("No outputs yet.")


def render(data: ReportData, directory: Path, title: str = "td-ray report") -> Path:
    """Write the plots and `report.html` into `directory` (each file atomically); returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    directory.mkdir(parents=True, exist_ok=True)
    lineage = "".join(f"<tr><td>{_escape(label)}</td><td style='text-align:left'>{_escape(value)}</td></tr>"
                      for label, value in data.lineage)
    sections = [
        ("Stages", _stage_table(data.stages)),
        ("Cost", _cost_section(data)),
        ("Translation quality flags", _qa_table(data)),
        ("Teacher scores", _scores_section(data, directory)),
        ("Training", _training_section(data, directory)),
        ("Evaluation", _evaluation_section(data, directory)),
        ("Lineage", f"<table>{lineage}</table>" if lineage else _missing("No lineage recorded.")),
        ("Outputs", _outputs(data)),
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_escape(title)}</h1><p>workspace <code>"
            f"{_escape(data.workspace)}</code>; pipeline run <code>{_escape(data.parent_run_id or 'none')}</code></p>"
            + "".join(f"<h2>{_escape(heading)}</h2>{body}" for heading, body in sections) + "</body></html>\n")
    path = directory / "report.html"
    temporary = directory / f".report.html.{uuid.uuid4().hex}.tmp"
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return path
