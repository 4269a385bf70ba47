"""One standalone HTML page for an eval report: every score with each random baseline and the gap beside it,
and the plots (embedded as data URIs, so the file opens from disk and can be sent on its own)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from saelab.eval.frontier import STYLE

REPORT_HTML = "report.html"


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return html.escape(str(value))


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img class='plot' alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def score_table(
    table_id: str, sae: dict[str, Any], baselines: dict[str, dict[str, Any]], keys: list[str]
) -> str:
    """Rows: metric | SAE | per baseline: value and gap (SAE - baseline)."""
    names = list(baselines)
    head = "".join(f"<th>{html.escape(n)}</th><th>gap</th>" for n in names)
    rows = []
    for key in keys:
        cells = []
        for name in names:
            b = baselines[name].get(key)
            gap = (
                sae[key] - b
                if isinstance(b, (int, float)) and isinstance(sae.get(key), (int, float))
                else None
            )
            cells.append(f"<td class='num'>{_num(b)}</td><td class='num gap'>{_num(gap)}</td>")
        rows.append(
            f"<tr data-metric='{html.escape(key)}'><td>{html.escape(key)}</td>"
            f"<td class='num sae'>{_num(sae.get(key))}</td>{''.join(cells)}</tr>"
        )
    return (
        f"<table id='{table_id}'><thead><tr><th>metric</th><th>SAE</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _core(report: dict[str, Any]) -> str:
    core = report.get("core")
    if not core:
        return ""
    recon = report["reconstruction"]
    baselines = {name: b.get("reconstruction", {}) for name, b in core.get("baselines", {}).items()}
    keys = [
        k
        for k in ("fvu", "explained_variance", "cosine", "l0", "mse", "relative_reconstruction_bias")
        if k in recon
    ]
    parts = [
        "<h2>Reconstruction and sparsity</h2>",
        f"<p>{report['tokens']:,} tokens from source batch {report['data']['start_batch']} "
        f"(held out: {_num(report['data']['held_out'])}).</p>",
        score_table("core", recon, baselines, keys),
    ]
    if "lm" in report:
        lm = report["lm"]
        parts.append(
            "<table id='lm'><tr><th>CE clean</th><th>CE with SAE</th><th>CE zero-ablated</th><th>CE loss recovered</th>"
            "<th>KL</th></tr>"
            f"<tr><td class='num'>{_num(lm['ce_clean'])}</td><td class='num'>{_num(lm['ce_sae'])}</td>"
            f"<td class='num'>{_num(lm['ce_zero'])}</td><td class='num'>{_num(lm['ce_loss_score'])}</td>"
            f"<td class='num'>{_num(lm['kl_div'])}</td></tr></table>"
        )
    if "recovery" in report:
        recovery = {name: b.get("recovery", {}) for name, b in core.get("baselines", {}).items()}
        parts.append(score_table("recovery", report["recovery"], recovery, list(report["recovery"])))
    dead = report["dead"]
    parts.append(
        f"<p>Dead: {_num(dead['dead_frac'])} of latents silent over {dead['window_tokens']:,} tokens; "
        f"never fired: {_num(dead['never_fired_frac'])}.</p>"
    )
    return "".join(parts)


def _absorption(report: dict[str, Any]) -> str:
    section = report.get("absorption_first_letter")
    if not section:
        return ""
    parts = ["<h2>Feature absorption (first letter)</h2>"]
    if "skipped" in section:
        return parts[0] + f"<p class='skipped'>Not scored: {html.escape(section['skipped'])}</p>"
    sae = section["eval_result_metrics"]["mean"]
    baselines = {
        name: b.get("eval_result_metrics", {}).get("mean", {})
        for name, b in section.get("baselines", {}).items()
    }
    parts.append(
        f"<p>{section['words']['train']} training and {section['words']['test']} test words; "
        f"{len(section['eval_result_details'])} letters scored (probe F1 above "
        f"{section['eval_config']['min_probe_f1']}). Lower absorption is better, but only where the split "
        "latents really detect the letter (mean_split_feature_f1).</p>"
    )
    parts.append(score_table("absorption", sae, baselines, list(sae)))
    return "".join(parts)


def _probing(report: dict[str, Any]) -> str:
    section = report.get("sparse_probing")
    if not section:
        return ""
    parts = ["<h2>Sparse probing</h2>"]
    if "eval_result_metrics" not in section:
        return parts[0] + "<p class='skipped'>No task could be loaded.</p>"
    sae = section["eval_result_metrics"]["sae"]
    baselines = {name: b["eval_result_metrics"]["sae"] for name, b in section.get("baselines", {}).items()}
    llm = section["eval_result_metrics"]["llm"]
    tasks = ", ".join(html.escape(d["dataset_name"]) for d in section["eval_result_details"])
    parts.append(f"<p>Tasks: {tasks}. Model dimensions as the reference: ")
    parts.append(", ".join(f"{html.escape(k)} {_num(v)}" for k, v in llm.items()) + ".</p>")
    parts.append(score_table("probing", sae, baselines, list(sae)))
    for skipped in section.get("skipped", []):
        parts.append(
            f"<p class='skipped'>Skipped {html.escape(skipped['dataset_name'])}: {html.escape(skipped['reason'])}</p>"
        )
    return "".join(parts)


def report_html(report: dict[str, Any], plots: list[Path], title: str = "saelab eval") -> str:
    """The page for `report` with the PNG files `plots` embedded."""
    sae = report["sae"]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.get("timing_s", {}).items())
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>SAE: {html.escape(str(sae['architecture']))}, d_in {sae['d_in']}, {sae['d_sae']} latents. "
        f"Suite: {html.escape(', '.join(report.get('suite', [])))}. Time: {html.escape(timing)}.</p>",
        "<p>Baselines are built from this SAE: <b>random_decoder</b> (its encoder, random decoder directions), "
        "<b>random_directions</b> (random tied directions at its L0), <b>init</b> (its variant at "
        "initialisation). Gap = SAE minus baseline.</p>",
        _core(report),
        _absorption(report),
        _probing(report),
        "<h2>Plots</h2><div class='figs'>" + "".join(_image(p) for p in plots) + "</div>",
        "<script id='report-data' type='application/json'>"
        + json.dumps(report).replace("</", "<\\/")
        + "</script>",
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>",
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}img.plot{{max-width:48%;margin:0.5%}}"
        ".gap{color:#555}.skipped{color:#a40}</style></head><body>" + "".join(body) + "</body></html>"
    )
