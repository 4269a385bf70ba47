"""The documentation's guarantees: every object a package exports has a docstring (the API reference shows
them), the generated configuration reference lists every field of every config schema, and the offline check
of the built site catches remote scripts, stylesheets and fonts."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
import types
from pathlib import Path

import pytest

import saelab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_site_offline  # noqa: E402


def public_packages() -> list[types.ModuleType]:
    """`saelab` and each of its packages."""
    names = ["saelab"] + [f"saelab.{m.name}" for m in pkgutil.iter_modules(saelab.__path__) if m.ispkg]
    return [importlib.import_module(name) for name in names]


def own_doc(obj: object) -> str:
    """The docstring written for `obj` itself: a class's own (not a base's, nor the signature dataclasses make
    up), a function's or property's."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        return "" if doc.startswith(f"{obj.__name__}(") else doc.strip()
    if isinstance(obj, property):
        obj = obj.fget
    return (getattr(obj, "__doc__", None) or "").strip()


def missing_docstrings(modules: list[types.ModuleType]) -> list[str]:
    """`module.name` for every exported function or class (and public method or property of an exported class
    defined there) without a docstring."""
    missing, seen = [], set()
    for module in modules:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or callable(obj)):
                continue
            if not own_doc(obj):
                missing.append(f"{module.__name__}.{name}")
            if not inspect.isclass(obj) or obj in seen:
                continue
            seen.add(obj)
            for attr, value in vars(obj).items():
                member = getattr(value, "__func__", value)
                if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                if not own_doc(member):
                    missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_every_exported_object_has_a_docstring():
    modules = public_packages()
    assert sum(len(getattr(m, "__all__", [])) for m in modules) > 80  # the packages do export their API
    assert missing_docstrings(modules) == []


def test_missing_docstring_is_caught():
    @dataclasses.dataclass
    class Undocumented:
        x: int = 0

        def public(self) -> int:
            return self.x

    class Documented:
        """Has one."""

        @property
        def size(self) -> int:
            return 1

    def bare() -> None:
        pass

    module = types.ModuleType("fake")
    module.Undocumented, module.Documented, module.bare = Undocumented, Documented, bare
    module.__all__ = ["Undocumented", "Documented", "bare"]
    assert missing_docstrings([module]) == [
        "fake.Undocumented",
        "fake.Undocumented.public",
        "fake.Documented.size",
        "fake.bare",
    ]


@pytest.mark.slow
def test_config_reference_lists_every_field_of_every_group():
    docs_hooks = pytest.importorskip("docs_hooks")
    from saelab.app.config import EvalRunConfig, HarvestRunConfig, InspectRunConfig
    from saelab.sae.registry import variant_classes
    from saelab.sources import source_config_classes
    from saelab.train.config import LoggingConfig, TrainerConfig

    page = docs_hooks.config_reference()
    blocks = page.split("\n### ")[1:]
    sections = {block.split("`")[1]: block for block in blocks if block.startswith("`")}
    yaml_names = {p.stem for p in (ROOT / "saelab" / "configs" / "sae").glob("*.yaml")}
    assert yaml_names == {cls.architecture for cls in variant_classes()}  # every variant has its page section
    for cls in variant_classes():
        block = sections[f"sae={cls.architecture}"]
        for f in dataclasses.fields(cls.config_class):
            if f.name != "metadata":
                assert f"| `sae.{f.name}` |" in block, (cls.architecture, f.name)
    for name in ("synthetic", "pairs", "smollm2", "model", "cache"):
        block = sections[f"source={name}"]
        kind = "model" if name == "smollm2" else name
        for f in dataclasses.fields(source_config_classes()[kind]):
            assert f"| `source.{f.name}` |" in block, (name, f.name)
    for prefix, cls in [("trainer.", TrainerConfig), ("logging.", LoggingConfig)]:
        for f in dataclasses.fields(cls):
            row = next(line for line in page.splitlines() if line.startswith(f"| `{prefix}{f.name}` |"))
            assert not row.endswith("|  |"), f"{prefix}{f.name} has no doc"  # every trainer / logging field
    for cls in (EvalRunConfig, HarvestRunConfig, InspectRunConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in page or f.name in ("eval", "inspect", "explain", "logging", "source")
    # a value the YAML sets, not the dataclass: sae/topk.yaml and source/smollm2.yaml
    assert "| `sae.k` |" in sections["sae=topk"]
    assert "| `source.model` | `smollm2` |" in sections["source=smollm2"]


def test_offline_check_catches_remote_resources(tmp_path):
    html = """<html><head>
    <link rel="preconnect" href="https://fonts.gstatic.com" crossorigin>
    <link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">
    <link href="//cdn.example.org/x.css" rel="stylesheet">
    <script src="https://unpkg.com/mermaid/dist/mermaid.min.js"></script>
    <link rel="stylesheet" href="assets/stylesheets/main.css">
    <script src="assets/javascripts/bundle.js"></script>
    </head><body><a href="https://github.com/x/y">a link is fine</a></body></html>"""
    assert len(check_site_offline.remote_references(html)) == 4
    css = "@import url('https://fonts.googleapis.com/css2?family=Inter'); .a { background: url(img.png) }"
    assert check_site_offline.remote_references(css)
    assert check_site_offline.remote_references(".a { background: url(img.png) }") == []
    (tmp_path / "index.html").write_text("<html><a href='https://example.org'>x</a></html>")
    assert check_site_offline.main(["check", str(tmp_path)]) == 0
    (tmp_path / "page.html").write_text(html)
    assert check_site_offline.main(["check", str(tmp_path)]) == 1


def test_help_run_times_are_the_readmes(capsys):
    """`saelab --help` prints run times and harvest sizes; each figure in it is one the README gives too, so the
    two cannot drift apart."""
    from saelab.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().err
    figures = re.findall(r"\b\d[\d.,]* (?:s|min|ms|MB|GB|tokens/s)\b", printed)
    assert len(figures) >= 10
    readme = (ROOT / "README.md").read_text()
    assert [figure for figure in figures if figure not in readme] == []
