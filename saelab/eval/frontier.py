"""The sparsity / fidelity frontier of several SAEs: L0 against FVU (lower is better for both) and against CE
loss recovered (higher is better), the Pareto front marked, as a PNG per metric and an HTML table.

A point is Pareto-optimal when no other point is at least as good on both axes and better on one. Sweeps
(`saelab sweep-summary`, the end of every sweep: `write_sweep_frontier`) take each run's held-out L0 / FVU
from its summary.json when it measured them (trainer.eval_every), else the figures of its final batch;
`saelab eval` over several SAEs takes them from each report, all on the same held-out tokens.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from saelab.core.atomic import atomic_file

#: metric -> (axis label, higher is better)
METRICS = {"fvu": ("FVU", False), "ce_loss_score": ("CE loss recovered", True)}
FRONTIER_HTML = "frontier.html"


def pareto_front(points: list[dict[str, Any]], metric: str, higher_is_better: bool) -> set[int]:
    """Indices of the points (with an L0 and a value of `metric`) that no other point dominates."""
    usable = [
        (i, p["l0"], p[metric] if higher_is_better else -p[metric])
        for i, p in enumerate(points)
        if _finite(p.get("l0")) and _finite(p.get(metric)) and p.get("kind", "run") == "run"
    ]
    front = set()
    for i, l0, value in usable:
        dominated = any(
            (l0b <= l0 and vb >= value) and (l0b < l0 or vb > value) for j, l0b, vb in usable if j != i
        )
        if not dominated:
            front.add(i)
    return front


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Frontier points of a sweep's summary rows (`saelab.app.sweep.collect_sweep`): runs that are done."""
    done = [row for row in rows if row.get("status") == "done"]
    shared = set.intersection(*(set(row.get("overrides") or []) for row in done)) if len(done) > 1 else set()
    points = []
    for row in done:
        own = " ".join(o for o in row.get("overrides") or [] if o not in shared)[:40]
        number = f"{row['job']}" if row.get("job") is not None else str(row.get("run"))
        points.append(
            {
                "name": f"{number}: {own}" if own else number,
                "run": row.get("run"),
                "overrides": list(row.get("overrides") or []),
                "l0": row.get("heldout/l0", row.get("l0")),
                "fvu": row.get("heldout/fvu", row.get("fvu")),
                "ce_loss_score": row.get("ce_loss_score"),
                "kind": "run",
            }
        )
    return points


def report_point(name: str, report: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """A frontier point from an eval report (`saelab.eval.evaluate`)."""
    recon = report.get("reconstruction", {})
    return {
        "name": name,
        "run": name,
        "overrides": overrides or [],
        "l0": recon.get("l0"),
        "fvu": recon.get("fvu"),
        "ce_loss_score": report.get("lm", {}).get("ce_loss_score"),
        "kind": "run",
    }


def baseline_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's baselines as frontier points (drawn, never on the front)."""
    out = []
    for name, figures in report.get("core", {}).get("baselines", {}).items():
        recon = figures.get("reconstruction", {})
        out.append({"name": name, "l0": recon.get("l0"), "fvu": recon.get("fvu"), "kind": "baseline"})
    return out


def write_frontier(
    points: list[dict[str, Any]], out_dir: str | Path, title: str = "SAE frontier"
) -> list[Path]:
    """frontier_<metric>.png for each metric some point has, and frontier.html (every point, its overrides and
    figures, Pareto-optimal rows marked). Returns the files written (none when no point has an L0)."""
    out = Path(out_dir)
    if not any(_finite(p.get("l0")) for p in points):
        return []
    from saelab.eval.plots import plot_frontier

    files, fronts = [], {}
    for metric, (label, higher) in METRICS.items():
        if not any(_finite(p.get(metric)) for p in points):
            continue
        fronts[metric] = pareto_front(points, metric, higher)
        files.append(plot_frontier(points, out / f"frontier_{metric}.png", metric, label, fronts[metric]))
    with atomic_file(out / FRONTIER_HTML) as tmp:
        tmp.write_text(frontier_html(points, fronts, [f.name for f in files], title))
    return [*files, out / FRONTIER_HTML]


def frontier_html(
    points: list[dict[str, Any]], fronts: dict[str, set[int]], images: list[str], title: str
) -> str:
    """A standalone page: the plots (relative links) and a table sorted by L0."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if _finite(value) else "-"

    metrics = list(fronts)
    head = "".join(f"<th>{html.escape(METRICS[m][0])}</th><th>front</th>" for m in metrics)
    order = sorted(range(len(points)), key=lambda i: points[i].get("l0") or math.inf)
    rows = []
    for i in order:
        p = points[i]
        marks = "".join(
            f"<td class='num'>{cell(p.get(m))}</td><td>{'&#9733;' if i in fronts[m] else ''}</td>"
            for m in metrics
        )
        overrides = html.escape(" ".join(p.get("overrides") or []))
        rows.append(
            f"<tr data-point='{i}' data-kind='{p.get('kind', 'run')}' data-front='{int(any(i in f for f in fronts.values()))}'>"
            f"<td>{html.escape(str(p['name']))}</td><td><code>{overrides}</code></td>"
            f"<td class='num'>{cell(p.get('l0'))}</td>{marks}</tr>"
        )
    figures = "".join(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>" for name in images)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(points)} points; &#9733; marks the Pareto front "
        "(no other run has both a lower L0 and a better value). A sweep's figures are each run's held-out "
        "ones where it measured them (trainer.eval_every), else those of its last training batch.</p>"
        f"<div class='figs'>{figures}</div><table id='frontier'><thead><tr><th>run</th><th>overrides</th>"
        f"<th>L0</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>"
    )


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tr[data-front='1']{background:#fff3f0}.figs img{max-width:48%;margin-right:1%}code{font-size:90%}"
)


def write_sweep_frontier(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> list[Path]:
    """The frontier of a sweep's runs (`sweep_points`) into the sweep directory."""
    return write_frontier(
        sweep_points(rows), sweep_dir, title=f"Sweep {Path(sweep_dir).name}: L0 vs fidelity"
    )
