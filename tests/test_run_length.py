"""How long a run trains by default: one pass over a cache (less its held-out batches), the default token count
from endless sources, a warning when a run re-reads a cache many times; summary.json records the resolved
sizes."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.app.cli import main
from saelab.buffer.cache import CacheWriter
from saelab.train.config import DEFAULT_TOTAL_TOKENS, TrainerConfig

ROWS = 256  # 2 shards of 128 rows, d 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("length") / "cache"
    writer = CacheWriter(root, {"h": 8}, "float32", 128, {"test": 1})
    gen = torch.Generator().manual_seed(0)
    for start in range(0, ROWS, 128):
        writer.add({"h": torch.randn(128, 8, generator=gen)}, torch.arange(start, start + 128), contexts=1)
    writer.finish({"h": {"hook_name": "h"}}, wall_seconds=0.0)
    return root


def train(cache, run, *overrides):
    main(["train", "source=cache", f"source.path={cache}", "sae.k=4", "trainer.batch_size=24",
          "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={run}", *overrides])  # fmt: skip
    return json.loads((run / "summary.json").read_text())


def test_a_cache_is_read_once_by_default_and_the_summary_records_resolved_sizes(cache, tmp_path):
    summary = train(cache, tmp_path / "one_pass")
    assert summary["steps"] == ROWS // 24 and summary["tokens"] == (ROWS // 24) * 24  # 10 batches of 24
    assert summary["config"]["trainer"]["total_tokens"] == 240
    assert (summary["config"]["sae"]["d_in"], summary["config"]["sae"]["d_sae"]) == (8, 16 * 8)
    held = train(cache, tmp_path / "held_out", "trainer.eval_every=5", "trainer.eval_batches=3")
    assert held["steps"] == ROWS // 24 - 3  # the held-out batches are not re-read as training data


def test_many_passes_over_a_cache_are_warned_about(cache, tmp_path):
    with pytest.warns(UserWarning, match=r"reads the source's 256 distinct rows 4\.[0-9] times over"):
        train(cache, tmp_path / "many", "trainer.total_tokens=1200")  # 50 batches of 24


def test_endless_sources_keep_the_default_length():
    assert TrainerConfig().for_source(object()).total_tokens == DEFAULT_TOTAL_TOKENS == 20_000_000
    assert TrainerConfig(total_tokens=4096).for_source(object()).total_tokens == 4096
