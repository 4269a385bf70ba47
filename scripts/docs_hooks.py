"""mkdocs hooks (mkdocs.yml `hooks:`): pages generated from the repository at build time, so they cannot drift.

- `index.md`: README.md, its links made relative to the site (the README is the home page);
- `benchmarks.md`: BENCHMARKS.md, its links into `docs/` made relative to the site;
- `reference/config.md`: every config group and field, its default and its doc, from the config dataclasses
  and the YAML files Hydra composes (`saelab/configs/`);
- `tutorials/<name>.md`: each jupytext script `docs/tutorials/<name>.py` as a page: text, code and the printed
  output saved by `scripts/run_tutorials.py` in docs/tutorials/executed/ (CI executes the scripts; the site build
  does not run them).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "saelab" / "configs"


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages to the site's files (mkdocs event)."""
    pages = {
        "index.md": readme_page(),
        "benchmarks.md": benchmarks_page(),
        "reference/config.md": config_reference(),
    }
    for script in sorted((ROOT / "docs" / "tutorials").glob("*.py")):
        pages[f"tutorials/{script.stem}.md"] = tutorial_page(script)
    for path, text in pages.items():
        files.append(File.generated(config, path, content=text))
    return files


# ---- BENCHMARKS.md --------------------------------------------------------------------------------------------


def readme_page() -> str:
    """README.md with its links to `docs/...`, BENCHMARKS.md and the tutorial scripts pointing at site pages."""
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"\]\(docs/tutorials/(\w+)\.py\)", r"](tutorials/\1.md)", text)
    text = re.sub(r"\]\(docs/", "](", text)
    return text.replace("](BENCHMARKS.md)", "](benchmarks.md)")


def benchmarks_page() -> str:
    """BENCHMARKS.md with `](docs/x)` links pointing at the site's own copy of x."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


# ---- tutorials --------------------------------------------------------------------------------------------------


def tutorial_page(script: Path) -> str:
    """A jupytext percent script as markdown: its markdown cells as text, its code cells as python blocks."""
    import jupytext

    notebook = jupytext.read(script)
    outputs = executed_outputs(script, notebook)
    parts = []
    code_index = 0
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.source.strip():
            parts.append(f"```python\n{cell.source}\n```")
            text = outputs[code_index] if outputs else ""
            if text.strip():
                parts.append(f"```text\n{text.rstrip()}\n```")
        if cell.cell_type == "code":
            code_index += 1
    parts.append(
        f"*This page is the script `docs/tutorials/{script.name}` (jupytext percent format): run it with "
        f"`python docs/tutorials/{script.name}`, or open it as a notebook with "
        f"`jupytext --to ipynb docs/tutorials/{script.name}`. CI executes it (tests/test_tutorials.py).*"
    )
    return "\n\n".join(parts) + "\n"


def executed_outputs(script: Path, notebook: Any) -> list[str] | None:
    """The printed text of each code cell in docs/tutorials/executed/<name>.ipynb (scripts/run_tutorials.py),
    or None when there is none or its code differs from the script's (then the page shows the code alone)."""
    import nbformat

    path = script.parent / "executed" / f"{script.stem}.ipynb"
    if not path.is_file():
        return None
    executed = nbformat.read(path, as_version=4)
    ran = [cell for cell in executed.cells if cell.cell_type == "code"]
    if [cell.source for cell in ran] != [cell.source for cell in notebook.cells if cell.cell_type == "code"]:
        return None
    texts = []
    for cell in ran:
        streams = [out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout"]
        texts.append("".join(streams))
    return texts


# ---- configuration reference ------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: a `# comment` on its line or a `name: text` / `a / b: text` entry of the docstring of the
    class or a base class (first found wins)."""
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        docs = {**comment_docs(klass), **docs}
        names = [f.name for f in dataclasses.fields(klass)]
        for name, text in docstring_entries(inspect.getdoc(klass) or "", names).items():
            docs.setdefault(name, text)
    return docs


def comment_docs(cls: type) -> dict[str, str]:
    """Trailing `# comments` on the field lines of a dataclass body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines()
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1]
            match = re.match(r"\s+(\w+)\s*:", line)
            if match and tok.start[1] > 0 and line[: tok.start[1]].strip():
                out[match.group(1)] = tok.string.lstrip("#").strip()
    return out


def docstring_entries(doc: str, names: list[str]) -> dict[str, str]:
    """Split a docstring into `name: text` entries (a header may list several names: `a / b:`, `a, b:`)."""
    flat = " ".join(doc.split())
    name_alt = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    if not name_alt:
        return {}
    header = re.compile(
        rf"(?:(?<=^)|(?<=[.;:)] )|(?<= and ))((?:`?(?:{name_alt})`?(?: \([^)]*\))?(?: ?[/,] ?| and )?)+)(?::| -) "
    )
    matches = list(header.finditer(flat))
    out: dict[str, str] = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(flat)
        text = flat[match.end() : end].strip()
        for name in re.findall(rf"\b({name_alt})\b", match.group(1)):
            out.setdefault(name, text)
    return out


def compose(overrides: list[str], config_name: str = "config") -> Any:
    """The config Hydra composes for `saelab <command> <overrides>` (recipes excluded by the caller's choice)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from saelab.app.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def value_text(value: Any) -> str:
    """A default as it would be typed on the command line."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif value == "???":
        text = "??? (required)"
    else:
        text = str(value)
    return f"`{text}`" if text else '`""`'


def field_table(cls: type, node: Any, prefix: str) -> str:
    """A markdown table of the fields of `cls`: the composed value in `node`, the dataclass default, the doc."""
    from omegaconf import OmegaConf

    docs = field_docs(cls)
    rows = ["| field | default | dataclass default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name == "metadata":
            continue
        composed = OmegaConf.select(node, f.name, throw_on_missing=False) if node is not None else None
        if f.default is not dataclasses.MISSING:
            plain = f.default
        elif f.default_factory is not dataclasses.MISSING:
            plain = f.default_factory()
        else:
            plain = "???"
        composed_text = value_text(composed) if node is not None else value_text(plain)
        if dataclasses.is_dataclass(plain):
            continue
        doc = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {composed_text} | {value_text(plain)} | {doc} |")
    return "\n".join(rows)


def config_section(heading: str, cls: type, node: Any, prefix: str) -> list[str]:
    """Markdown lines of one config class: the heading, the class's introduction, its field table."""
    return [heading, "", class_intro(cls), "", field_table(cls, node, prefix), ""]


def class_intro(cls: type) -> str:
    """The first paragraph of a class's docstring."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def config_reference() -> str:
    """The configuration reference page."""
    from omegaconf import OmegaConf

    from saelab.app.config import EvalRunConfig, HarvestRunConfig, InspectRunConfig, SweepConfig
    from saelab.eval.config import EvalConfig
    from saelab.inspect.config import InspectConfig
    from saelab.inspect.explain.config import ExplainConfig
    from saelab.sae.registry import variant_classes
    from saelab.sources import source_config_classes
    from saelab.train.config import LoggingConfig, TrainerConfig

    out = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses and the YAML files in `saelab/configs/` each time the site is "
        "built (`scripts/docs_hooks.py`). **default** is the value `saelab <command>` composes with that group "
        "option and no recipe (a recipe `configs/recipe/<sae>_<source>.yaml` may change it, see the end of "
        "this page); **dataclass default** is the field's default in Python. Every field is a command-line "
        "override, e.g. `saelab train sae=topk sae.k=32 trainer.lr=1e-3`.",
    ]
    train_neutral = ["source=cache"]  # no recipe applies to (sae, cache)

    out += ["", "## `sae`: SAE variants and transcoders", ""]
    classes = {cls.architecture: cls for cls in variant_classes()}
    for name in sorted(p.stem for p in (CONFIG_DIR / "sae").glob("*.yaml")):
        cls = classes[name]
        node = compose([f"sae={name}", *train_neutral]).sae
        out += config_section(f"### `sae={name}`", cls.config_class, node, "sae.")

    out += ["## `source`: where activations come from", ""]
    kinds = source_config_classes()
    for name in sorted(p.stem for p in (CONFIG_DIR / "source").glob("*.yaml")):
        node = compose([f"source={name}", "sae=topk"]).source
        cls = kinds[OmegaConf.select(node, "kind")]
        out += config_section(f"### `source={name}`", cls, node, "source.")

    base = compose(train_neutral)
    for group, cls, node, intro in [
        ("trainer", TrainerConfig, base.trainer, "`trainer=default`"),
        ("logging", LoggingConfig, base.logging, "`logging=default` (and `logging=wandb`, below)"),
        ("sweep", SweepConfig, base.sweep, "search sweepers' objective (`saelab train -m`)"),
    ]:
        out += config_section(f"## `{group}`: {intro}", cls, node, f"{group}.")
    wandb = compose(["logging=wandb", *train_neutral]).logging
    out += ["### `logging=wandb`", "", field_table(LoggingConfig, wandb, "logging."), ""]

    eval_cfg = compose(["source=synthetic"], "eval")
    out += config_section("## `saelab eval`", EvalRunConfig, eval_cfg, "")
    out += config_section("### `eval`", EvalConfig, eval_cfg.eval, "eval.")
    for sub in dataclasses.fields(EvalConfig):
        sub_cls = sub.default_factory if sub.default_factory is not dataclasses.MISSING else None
        if isinstance(sub_cls, type) and dataclasses.is_dataclass(sub_cls):
            sub_node = OmegaConf.select(eval_cfg.eval, sub.name)
            out += config_section(f"#### `eval.{sub.name}`", sub_cls, sub_node, f"eval.{sub.name}.")

    harvest = compose(["source=smollm2"], "harvest")
    out += config_section("## `saelab harvest`", HarvestRunConfig, harvest, "")
    insp = compose(["source=smollm2"], "inspect")
    out += config_section("## `saelab inspect`", InspectRunConfig, insp, "")
    out += config_section("### `inspect`", InspectConfig, insp.inspect, "inspect.")
    out += config_section("### `explain`", ExplainConfig, insp.explain, "explain.")

    out += [
        "## Recipes",
        "",
        "Settings picked automatically for one variant on one source "
        "(`configs/recipe/<sae>_<source>.yaml`); command-line overrides win.",
        "",
    ]
    for path in sorted((CONFIG_DIR / "recipe").glob("*.yaml")):
        out += [f"### `{path.stem}`", "", "```yaml", path.read_text().strip(), "```", ""]

    out += ["## Launchers and sweepers (`hydra/launcher=...`, `hydra/sweeper=...`)", ""]
    for path in sorted((CONFIG_DIR / "hydra").glob("*/*.yaml")):
        out += [
            f"### `hydra/{path.parent.name}={path.stem}`",
            "",
            "```yaml",
            path.read_text().strip(),
            "```",
            "",
        ]
    return "\n".join(out) + "\n"
