"""Execute the tutorials (docs/tutorials/*.py, jupytext percent scripts) and save each with its outputs as
docs/tutorials/executed/<name>.ipynb, which the site shows under the code (scripts/docs_hooks.py) while its code
cells match the script's (tests/test_tutorials.py checks they do). Run from the repository's root after changing
a tutorial: `python scripts/run_tutorials.py [name ...]` (needs the docs extra and `saelab fetch-assets`)."""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"


def execute(script: Path) -> Path:
    """Run `script` as a notebook in the repository's root; write and return the executed notebook's path."""
    notebook = jupytext.read(script)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    out = TUTORIALS / "executed" / f"{script.stem}.ipynb"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(out)
    return out


def main(names: list[str]) -> None:
    scripts = [TUTORIALS / f"{name}.py" for name in names] or sorted(TUTORIALS.glob("*.py"))
    for script in scripts:
        print(f"{script.name} -> {execute(script).relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
