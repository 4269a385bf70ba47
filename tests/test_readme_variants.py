"""Every `saelab train sae=...` example of the README and of docs/variants.md (their ```bash blocks; a missing
file is skipped) that runs on the planted data trains a good SAE: each distinct command runs as written plus
overrides that shrink it (a smaller planted set, fewer tokens), and the summary's
recovery of the planted features must come within 10 points of the default job's (`saelab train`, TopK) at the
same scale. Examples meant for other data name it and are not run here: a language model's (`source=smollm2`,
`model`, `cache`), or a planted structure of their own (`source.structure=...`: the GBA paper's toy, tested in
test_recovery_toy.py; Matryoshka on hierarchical features, tested in test_matryoshka.py)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from saelab.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "variants.md")
#: Commands that are not a planted-data training run (a language model's data, sweeps, config printing, resumes).
NOT_PLANTED = (
    "source=smollm2",
    "source=model",
    "source=cache",
    "source.structure=",
    "-m",
    "--cfg",
    "trainer.resume_from",
    "logging=",
)
#: Appended to each example (the last override of a field wins): 128 planted features in 32 dimensions, 3 active
#: per row, instead of 512 in 64 with 5; 256 latents; 400 batches of 512 rows.
SMALL = [
    "source.d_in=32",
    "source.n_features=128",
    "source.mean_active=3",
    "sae.expansion_factor=8",
    "trainer.total_tokens=204800",
    "trainer.batch_size=512",
    "trainer.device=cpu",
    "logging.progress=false",
]


def train_commands() -> list[list[str]]:
    """The `saelab train` commands of the pages' ```bash blocks that set a variant (`sae=...`), as argument lists
    after `saelab` (continued lines joined, comments dropped), each once."""
    commands = []
    for page in PAGES:
        text = page.read_text() if page.exists() else ""
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                args = shlex.split(line, comments=True)
                wanted = args[:2] == ["saelab", "train"] and any(a.startswith("sae=") for a in args)
                if wanted and args[1:] not in commands:
                    commands.append(args[1:])
    return commands


def planted_examples() -> list[list[str]]:
    """The train commands that run on the planted data."""
    return [args for args in train_commands() if not any(a.startswith(NOT_PLANTED) for a in args)]


EXAMPLES = planted_examples()


def test_the_pages_show_each_variant_this_suite_owns():
    """docs/variants.md documents these variants with a command each (matryoshka's names its own data)."""
    shown = {a.removeprefix("sae=") for args in train_commands() for a in args if a.startswith("sae=")}
    assert {"batchtopk", "matryoshka", "jumprelu", "relu"} <= shown, shown
    assert {"batchtopk", "jumprelu", "relu"} <= {a.removeprefix("sae=") for e in EXAMPLES for a in e}


def recovered(args: list[str], folder: Path) -> float:
    """Run `saelab <args>` shrunk by SMALL into folder; the fraction of planted features its SAE recovered."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is fastest (on a loaded machine two threads spin)
    try:
        main([*args, *SMALL, f"hydra.run.dir={folder}"])
    finally:
        torch.set_num_threads(threads)
    return json.loads((folder / "summary.json").read_text())["frac_recovered"]


@pytest.fixture(scope="module")
def default_job(tmp_path_factory) -> float:
    """The default job's recovery at the same scale: `saelab train` (TopK, k 8 on the planted data)."""
    return recovered(["train"], tmp_path_factory.mktemp("default"))


@pytest.mark.parametrize("args", EXAMPLES, ids=[" ".join(a[1:]) for a in EXAMPLES])
def test_each_readme_variant_example_recovers_as_the_default_job_does(args, tmp_path, default_job):
    got = recovered(args, tmp_path)
    assert got >= default_job - 0.1, (got, default_job)
