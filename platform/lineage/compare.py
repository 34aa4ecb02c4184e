"""``dinoforge compare RUN_A RUN_B``: two pipeline runs side by side in the terminal, as MLflow's
compare page shows them: headline metrics, then the params that differ."""

from __future__ import annotations

import json
import sys
from urllib.parse import quote

from dinoforge.lineage.locate import resolve_run
from mlflow.entities import Run

# Shown first, in this order, when present; the runs' other metrics follow by name.
HEADLINE_ORDER = (
    "knn_top1",
    "linear_top1",
    "logreg_top1",
    "retrieval_map_medium",
    "images_per_s",
    "wall_seconds",
    "loss",
)


def compare_rows(a: Run, b: Run) -> tuple[list[tuple[str, float | None, float | None]], list[tuple[str, str, str]]]:
    """(metrics: name, last value in a, in b), (params whose values differ: name, a, b; a
    param only one run has shows ``-`` for the other)."""
    names = set(a.data.metrics) | set(b.data.metrics)
    ordered = [n for n in HEADLINE_ORDER if n in names] + sorted(names - set(HEADLINE_ORDER))
    metrics = [(n, a.data.metrics.get(n), b.data.metrics.get(n)) for n in ordered]
    keys = sorted(set(a.data.params) | set(b.data.params))
    params = [
        (k, a.data.params.get(k, "-"), b.data.params.get(k, "-"))
        for k in keys
        if a.data.params.get(k) != b.data.params.get(k)
    ]
    return metrics, params


def compare_path(a: Run, b: Run) -> str:
    """The MLflow UI's compare page of the two runs, relative to the UI's address."""
    runs = json.dumps([a.info.run_id, b.info.run_id])
    experiments = json.dumps(sorted({a.info.experiment_id, b.info.experiment_id}))
    return f"/#/compare-runs?runs={quote(runs)}&experiments={quote(experiments)}"


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_compare(ref_a: str, ref_b: str, tracking_uri: str | None = None) -> None:
    """Prints the table (rich) for two run directories or run ids. Runs in different stores
    compare here but not on one MLflow page: the page path is printed when they share a store."""
    from rich.console import Console
    from rich.table import Table

    uri_a, a = resolve_run(ref_a, tracking_uri)
    uri_b, b = resolve_run(ref_b, tracking_uri)
    metrics, params = compare_rows(a, b)
    table = Table(title=f"dinoforge compare ({uri_a})" if uri_a == uri_b else "dinoforge compare")
    table.add_column("")
    table.add_column(a.info.run_name or a.info.run_id)
    table.add_column(b.info.run_name or b.info.run_id)
    for name, value_a, value_b in metrics:
        table.add_row(name, _value(value_a), _value(value_b))
    table.add_section()
    for name, value_a, value_b in params:
        table.add_row(name, value_a, value_b)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe: no wrapping at 80 columns
    console.print(table)
    if not params:
        console.print("(no param differs)")
    if uri_a == uri_b:
        console.print(f"MLflow compare page: dinoforge ui --tracking-uri {uri_a}, then {compare_path(a, b)}")
