"""The package's layering, read from its source with `ast`: each package imports only packages of lower layers,
and no two packages import each other. The order is declared once, here, lowest first; packages in one layer are
independent of each other. `saelab/__init__.py` (the public API) may import anything.

    core                      atomic writes, value checks, derived seeds, settings diffs, devices
    kernels, parallel, data   sparse kernels; process groups and global-batch statistics; tokens and assets
    sae, harvest, buffer      SAE variants and their losses; activation hooks; mixing buffer and disk cache
    metrics, io, sources      codes/dead/reconstruction figures; files and peers' formats; activation sources
    train, splice             the training loop; an SAE inside a transformer
    eval                      evaluators
    inspect                   the feature browser
    app                       Hydra: commands, config schemas, jobs, sweeps, SLURM
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from variants import SAE_CONFIGS, trainable_architectures

from saelab.sae import available_architectures, get_sae_class

PACKAGE = Path(__file__).resolve().parents[1] / "saelab"
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("kernels", "parallel", "data"),
    ("sae", "harvest", "buffer"),
    ("metrics", "io", "sources"),
    ("train", "splice"),
    ("eval",),
    ("inspect",),
    ("app",),
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
#: Third-party packages only the app layer may import.
APP_ONLY = ("hydra", "omegaconf", "submitit")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved), at any depth in the file."""
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """Absolute names imported by the source of module `name` (with each `from m import a` also as m.a)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_of(module: str) -> str | None:
    """'saelab.sae.topk' -> 'sae'; None outside saelab or for the root package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "saelab" and len(parts) > 1 else None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_package_has_a_layer_and_no_module_sits_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == [], f"modules outside any package: {top}"
    packages = {p.parent.relative_to(PACKAGE).parts[0] for p in SOURCES}
    assert packages == set(RANK), f"undeclared: {packages - set(RANK)}, gone: {set(RANK) - packages}"


def upward_imports(own: str, modules: set[str]) -> list[str]:
    """The modules that package `own` may not import, each with the reason."""
    wrong = []
    for module in sorted(modules):
        target = package_of(module)
        if module.split(".")[0] in APP_ONLY and own != "app":
            wrong.append(f"{module} (only the app layer imports Hydra / OmegaConf / submitit)")
        elif target is not None and target != own and target in RANK and RANK[target] >= RANK[own]:
            wrong.append(f"{module} (layer {RANK[target]} from {own}, layer {RANK[own]})")
    return wrong


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_import_only_lower_layers(path):
    wrong = upward_imports(package_of(module_name(path)), imported_modules(path))
    assert not wrong, f"{path.relative_to(PACKAGE)} imports {wrong}"


def test_no_two_packages_import_each_other():
    edges = {
        (package_of(module_name(path)), package_of(module))
        for path in SOURCES
        for module in imported_modules(path)
        if package_of(module) in RANK
    }
    loops = sorted((a, b) for a, b in edges if a < b and (b, a) in edges)
    assert loops == []


def test_the_checker_catches_upward_relative_and_late_imports():
    """The checks above can fail: relative imports are resolved, imports inside functions are read."""
    source = "from ..train import trainer\nfrom . import losses\ndef f():\n    import hydra\n    from saelab.io import x\n"
    modules = imports_of(source, "saelab.sae.fake", is_package=False)
    assert modules == {"saelab.train", "saelab.train.trainer", "saelab.sae", "saelab.sae.losses", "hydra",
                       "saelab.io", "saelab.io.x"}  # fmt: skip
    wrong = upward_imports("sae", modules)
    assert [w.split(" ")[0] for w in wrong] == [
        "hydra",
        "saelab.io",
        "saelab.io.x",
        "saelab.train",
        "saelab.train.trainer",
    ]
    assert upward_imports("app", modules) == []


def test_every_trainable_variant_has_one_yaml_and_every_yaml_a_variant():
    trainable = sorted(a for a in available_architectures() if get_sae_class(a).trainable)
    assert trainable_architectures() == trainable
    for name in trainable:
        assert f"architecture: {name}\n" in (SAE_CONFIGS / f"{name}.yaml").read_text()
