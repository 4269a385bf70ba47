"""Activation cache: exact round trips, shuffled-shard reading with exact resume, harvests that equal the
model's own activations, interrupted harvests that resume to the same cache, and training from a cache."""

import itertools
import json
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch
from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

from saelab.app.cli import main
from saelab.app.config import HarvestRunConfig
from saelab.app.harvest_job import run_harvest
from saelab.buffer.cache import PROGRESS, ActivationCache, CacheWriter
from saelab.data.tokens import excluded_token_ids, keep_mask
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import HarvestPipeline
from saelab.harvest.tlens import TransformerLensHarvester

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def id_rows(start: int, n: int, d: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def write_cache(root, chunks, dtype="float32", shard_tokens=100):
    writer = CacheWriter(root, {"h.a": chunks[0].shape[1], "h.b": 3}, dtype, shard_tokens, {"test": 1})
    start = 0
    for chunk in chunks:
        n = chunk.shape[0]
        writer.add({"h.a": chunk, "h.b": -chunk[:, :3]}, torch.arange(start, start + n), contexts=1)
        start += n
    return writer.finish({"h.a": {"hook_name": "h.a"}}, wall_seconds=1.0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(int(n), 7, generator=gen) for n in torch.randint(1, 80, (12,), generator=gen)]
    manifest = write_cache(tmp_path / "c", chunks, dtype, shard_tokens=100)
    cache = ActivationCache(tmp_path / "c")
    x = torch.cat(chunks)
    stored = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert torch.equal(cache.read_all("h.a"), x.to(stored))
    assert torch.equal(cache.read_all("h.b"), (-x[:, :3]).to(stored))
    assert torch.equal(
        torch.cat([cache.tokens(i) for i in range(len(cache.shard_rows))]), torch.arange(len(x)).int()
    )
    assert sum(manifest["shard_rows"]) == len(x) and all(r >= 100 for r in manifest["shard_rows"][:-1])
    assert manifest["hooks"]["h.a"]["mean_norm"] == pytest.approx(
        x.double().norm(dim=1).mean().item(), rel=1e-12
    )
    assert isinstance(cache._map("h.a", 0), np.memmap)
    assert not (tmp_path / "c" / PROGRESS).exists()
    assert not [p for p in (tmp_path / "c").rglob(".*")]  # no temporary files left


def test_batches_read_every_row_once_per_epoch_in_shuffled_shard_order(tmp_path):
    write_cache(tmp_path / "c", [id_rows(100 * i, 100, 4) for i in range(10)], shard_tokens=100)
    cache = ActivationCache(tmp_path / "c")
    stream = cache.batches("h.a", batch_size=50, seed=3, group_rows=200)
    batches = [next(stream) for _ in range(44)]  # 20 per epoch
    epoch = torch.cat(batches[:20])[:, 0]
    assert torch.equal(epoch.sort().values, torch.arange(1000, dtype=torch.float32))
    assert torch.equal(torch.cat(batches[20:40])[:, 0].sort().values, torch.arange(1000, dtype=torch.float32))
    shard_of = (epoch // 100).long()
    visit = list(dict.fromkeys(shard_of.tolist()))
    assert sorted(visit) == list(range(10)) and visit != list(range(10))  # shards in a shuffled order
    assert all(
        len(set(shard_of[i : i + 200].tolist())) == 2 for i in range(0, 1000, 200)
    )  # groups of 2 shards
    assert not torch.equal(batches[0], batches[20])  # the next epoch has its own order
    for start in (0, 7, 18):  # resuming at batch `start` gives exactly the same batches, across epochs
        resumed = cache.batches("h.a", batch_size=50, start_batch=start, seed=3, group_rows=200)
        for want in batches[start : start + 6]:
            assert torch.equal(next(resumed), want)


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation cache"):
        ActivationCache(tmp_path)
    write_cache(tmp_path / "c", [id_rows(0, 150, 4)], shard_tokens=100)
    cache = ActivationCache(tmp_path / "c")
    with pytest.raises(ValueError, match=r"holds hooks \['h.a', 'h.b'\]; set source.hook_name"):
        cache.check_hook(None)
    with pytest.raises(ValueError, match="'h.c' is not in the cache"):
        cache.check_hook("h.c")
    (tmp_path / "c" / "h.b" / "shard_00000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ActivationCache(tmp_path / "c")


# ---------------------------------------------------------------- harvesting a small TransformerLens model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HookedTransformer, tokenizer, source config over a small random-word corpus)."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    src = ModelSourceConfig(model="tiny", dataset=str(corpus), context_size=16, model_batch_size=4)
    return tiny_tl(n_layers=3), word_tokenizer(WORDS), src


class FlakyHarvester:
    """Delegates to a harvester and fails on call number `fail_at` (an interruption mid-harvest)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.hook_names, self.device = inner.hook_names, inner.device

    def __call__(self, tokens):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated interruption")
        return self.inner(tokens)


def harvest(tiny, out, fail_at=0, **overrides):
    model, tokenizer, src = tiny
    harvester = TransformerLensHarvester(model, HOOKS)
    if fail_at:
        harvester = FlakyHarvester(harvester, fail_at)
    cfg = HarvestRunConfig(source=src, output_dir=str(out), hook_names=HOOKS, total_tokens=0, shard_tokens=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return run_harvest(cfg, HarvestPipeline.from_tokenizer(harvester, tokenizer, src))


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    """(folder, manifest) of one uninterrupted harvest of the whole corpus."""
    out = tmp_path_factory.mktemp("harvest") / "cache"
    return out, harvest(tiny, out, progress=False)


def test_harvest_writes_the_models_own_activations(tiny, tiny_cache):
    model, tokenizer, _ = tiny
    folder, manifest = tiny_cache
    cache = ActivationCache(folder)
    pipeline = HarvestPipeline.from_tokenizer(None, tokenizer, tiny[2])
    tokens = torch.cat(list(pipeline.contexts.batches(4)))  # every context of the corpus
    keep = keep_mask(tokens, torch.tensor(excluded_token_ids(tokenizer)))
    with torch.no_grad():
        _, ref = model.run_with_cache(tokens)  # one full forward over all contexts, no filter
    for hook in HOOKS:
        assert torch.equal(cache.read_all(hook), ref[hook][keep])
    assert torch.equal(torch.cat([cache.tokens(i) for i in range(len(cache.shard_rows))]), tokens[keep].int())
    assert manifest["contexts"] == tokens.shape[0] and manifest["total_rows"] == int(keep.sum())
    assert int(keep.sum()) < tokens.numel()  # BOS and unknown-word rows were dropped


def test_interrupted_harvest_resumes_to_the_same_cache(tiny, tiny_cache, tmp_path):
    folder, full = tiny_cache
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        harvest(tiny, out, fail_at=5, progress=False)
    assert (out / PROGRESS).exists() and not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="interrupted harvest"):
        ActivationCache(out)
    done = len(json.loads((out / PROGRESS).read_text())["shard_rows"])
    assert 0 < done < len(full["shard_rows"])
    stray = out / HOOKS[0] / f"shard_{done:05d}.npy"  # a shard written just before the interruption
    np.save(stray, np.zeros((3, 32), np.float32))
    with pytest.raises(ValueError, match="source.context_size: 16 -> 8"):
        harvest((*tiny[:2], replace(tiny[2], context_size=8)), out, progress=False)
    resumed = harvest(tiny, out, progress=False)
    assert resumed["shard_rows"] == full["shard_rows"] and resumed["contexts"] == full["contexts"]
    a, b = ActivationCache(folder), ActivationCache(out)
    for hook in HOOKS:
        assert torch.equal(a.read_all(hook), b.read_all(hook))
        assert resumed["hooks"][hook]["mean_norm"] == pytest.approx(
            full["hooks"][hook]["mean_norm"], rel=1e-12
        )
    early = tmp_path / "early"  # interrupted before its first shard: still recognised and resumed
    with pytest.raises(RuntimeError, match="simulated interruption"):
        harvest(tiny, early, fail_at=2, progress=False)  # call 1 is the width probe, call 2 the first batch
    assert json.loads((early / PROGRESS).read_text())["shard_rows"] == []
    assert harvest(tiny, early, progress=False)["shard_rows"] == full["shard_rows"]
    with pytest.raises(FileExistsError, match="overwrite=true"):
        harvest(tiny, out, progress=False)
    b.close()  # a reader holds the cache until it is closed (or dropped): an overwrite waits for that
    assert harvest(tiny, out, total_tokens=100, overwrite=True, progress=False)["total_rows"] == 100
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saelab activation cache"):
        harvest(tiny, tmp_path / "other", progress=False)


def test_train_from_a_cache_end_to_end(tiny_cache, tmp_path):
    run = tmp_path / "run"
    main([
        "train", "source=cache", f"source.path={tiny_cache[0]}", f"source.hook_name={HOOKS[0]}",
        "sae=topk", "sae.k=4", "sae.expansion_factor=2", "trainer.total_tokens=512", "trainer.batch_size=32",
        "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={run}",
    ])  # fmt: skip
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert (
        cfg["d_in"] == 32
        and cfg["metadata"]["hook_name"] == HOOKS[0]
        and cfg["metadata"]["model_name"] == "tiny"
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 16


# ------------------------------------------------------------------ shard identity, damage, safe overwrite
def two_hook_cache(root, shard_tokens=50):
    """Two hooks of the same width (as resid_post and mlp_out are), 3 shards, different contents."""
    writer = CacheWriter(root, {"h.a": 4, "h.b": 4}, "float32", shard_tokens, {"test": 1})
    for start in range(0, 150, 50):
        x = id_rows(start, 50, 4)
        writer.add({"h.a": x, "h.b": -x}, torch.arange(start, start + 50), contexts=1)
    return writer.finish({}, wall_seconds=1.0)


def test_a_shard_of_another_hook_with_the_same_shape_is_refused(tmp_path):
    manifest = two_hook_cache(tmp_path / "c")
    assert manifest["version"] == 2 and set(manifest["shards"]) == {"h.a", "h.b", "tokens"}
    record = manifest["shards"]["h.a"][1]
    assert record["shape"] == [50, 4] and np.dtype(record["dtype"]) == np.float32
    (tmp_path / "c" / "h.b" / "shard_00001.npy").write_bytes(
        (tmp_path / "c" / "h.a" / "shard_00001.npy").read_bytes()
    )
    cache = ActivationCache(tmp_path / "c")  # shapes and dtypes agree: opening is cheap and passes
    assert torch.equal(cache.shard("h.a", 1), id_rows(50, 50, 4))
    with pytest.raises(
        ValueError, match=r"h\.b/shard_00001\.npy has CRC-32 .* for 'h\.b' shard 1.*another hook"
    ):
        cache.shard("h.b", 1)
    with pytest.raises(ValueError, match=r"h\.b/shard_00001\.npy has CRC-32"):
        ActivationCache(tmp_path / "c", verify=True)
    with pytest.raises(ValueError, match=r"h\.b/shard_00001\.npy has CRC-32"):
        list(itertools.islice(ActivationCache(tmp_path / "c").batches("h.b", batch_size=25), 10))


def test_damaged_files_are_named(tmp_path):
    two_hook_cache(tmp_path / "c")
    shard = tmp_path / "c" / "h.a" / "shard_00002.npy"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match=r"h\.a/shard_00002\.npy cannot be read \(.*mmap length.*truncated"):
        ActivationCache(tmp_path / "c")
    np.save(shard, np.zeros((50, 4), np.float16))  # right shape, wrong dtype
    with pytest.raises(
        ValueError, match=r"shard_00002\.npy holds float16 \(50, 4\), but the manifest says float32"
    ):
        ActivationCache(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["shard_rows"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json has no \['shard_rows'\].*harvest the cache again"):
        ActivationCache(tmp_path / "c")


def test_version_1_caches_are_still_read(tmp_path):
    two_hook_cache(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["shards"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    cache = ActivationCache(tmp_path / "c")
    assert torch.equal(cache.read_all("h.b"), -id_rows(0, 150, 4))
    with pytest.raises(ValueError, match="version-1 manifest without checksums"):
        cache.verify()


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_failed_overwrite_keeps_the_old_cache_and_crash_leftovers_are_removed(tiny, tiny_cache, tmp_path):
    import shutil

    from saelab.core.atomic import host_tag, temporary_name

    out = tmp_path / "cache"
    shutil.copytree(tiny_cache[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="simulated interruption"):
        harvest(tiny, out, fail_at=5, total_tokens=300, overwrite=True, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old cache is untouched ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # ... and the half-built one is gone
    assert ActivationCache(out).verify() == 3 * len(tiny_cache[1]["shard_rows"])
    # a crashed overwrite (its process is dead) leaves a temporary sibling: the next harvest removes it;
    # one of a live process (this one) is left alone
    crashed, live = tmp_path / f".cache.tmp-{host_tag()}-{dead_pid()}-0badc0de", temporary_name(out)
    crashed.mkdir()
    live.mkdir()
    manifest = harvest(tiny, out, total_tokens=100, overwrite=True, progress=False)
    assert manifest["total_rows"] == 100 and ActivationCache(out).total_rows == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", live.name])


def test_verify_command_checks_every_file(tiny_cache, tmp_path, capsys):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(tiny_cache[0], out)
    main(["harvest", f"output_dir={out}", "verify=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "shard files match" in capsys.readouterr().out
    shard = out / HOOKS[1] / "shard_00000.npy"
    array = np.load(shard)
    array[0, 0] += 1
    np.save(shard, array)
    with pytest.raises(SystemExit):  # Hydra prints the error and exits 1
        main(["harvest", f"output_dir={out}", "verify=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "shard_00000.npy has CRC-32" in capsys.readouterr().err


def test_held_out_batches_of_a_cache_are_never_trained_on(tmp_path):
    """512 distinct rows (column 0 is the row id), 2 held-out batches of 64: a run of 6 training batches never
    sees a held-out row; a run long enough to repeat the rows would train on them, so it is refused."""
    from saelab.sae.registry import build_sae
    from saelab.sae.topk import TopKConfig
    from saelab.sources.harvested import CacheSource, CacheSourceConfig
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    write_cache(tmp_path / "c", [id_rows(0, 512, 8)], shard_tokens=128)
    source = CacheSource(CacheSourceConfig(path=str(tmp_path / "c"), hook_name="h.a"))
    seen = []
    original = source.batches

    def recording(batch_size, start_batch=0):
        for x in original(batch_size, start_batch):
            seen.append(x[:, 0].clone())
            yield x

    source.batches = recording
    sae = build_sae(TopKConfig(d_in=8, d_sae=32, k=2))
    ok = TrainerConfig(total_tokens=64 * 6, batch_size=64, device="cpu", eval_every=3, eval_batches=2)
    Trainer(sae, ok).fit(source)
    held, trained = torch.cat(seen[:2]), torch.cat(seen[2:])
    assert trained.numel() == 64 * 6 and not torch.isin(held, trained).any()
    long = TrainerConfig(total_tokens=64 * 24, batch_size=64, device="cpu", eval_every=10, eval_batches=2)
    with pytest.raises(
        ValueError, match=r"reads 1,664 rows from a source of 512 distinct rows.* at most 384"
    ):
        Trainer(build_sae(TopKConfig(d_in=8, d_sae=32, k=2)), long).fit(source)


def test_eval_refuses_a_source_at_another_hook_than_the_sae_trained_at(tmp_path):
    from saelab.eval import EvalConfig, evaluate
    from saelab.sae.topk import TopKConfig, TopKSAE
    from saelab.sources.harvested import CacheSource, CacheSourceConfig

    write_cache(tmp_path / "c", [id_rows(0, 256, 8)])
    source = CacheSource(CacheSourceConfig(path=str(tmp_path / "c"), hook_name="h.a"))
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=2, metadata={"hook_name": "blocks.1.hook_resid_post"}))
    cfg = EvalConfig(total_tokens=128, batch_size=64, cooccurrence_latents=0)
    with pytest.raises(
        ValueError, match=r"trained at hook 'blocks\.1\.hook_resid_post' but source\.hook_name='h\.a'"
    ):
        evaluate(sae, source, cfg)
    sae.cfg.metadata["hook_name"] = "h.a"
    assert evaluate(sae, source, cfg).report["tokens"] == 128


def test_harvest_never_deletes_files_it_did_not_write(tiny, tiny_cache, tmp_path):
    """overwrite=true replaces a cache whole and a resume cleans up shards past the last recorded one: neither
    may take a user's files with them, so a cache folder holding some is refused, untouched."""
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(tiny_cache[0], out)
    (out / "NOTES.txt").write_text("mine")
    (out / HOOKS[0] / "my_analysis.npy").write_bytes(b"mine too")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"holds files a harvest did not write \(NOTES\.txt, blocks\.0"):
        harvest(tiny, out, total_tokens=100, overwrite=True, progress=False)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        harvest(tiny, interrupted, fail_at=3, total_tokens=300, progress=False)
    (interrupted / HOOKS[1] / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"blocks\.1\.hook_mlp_out/notes\.txt"):
        harvest(tiny, interrupted, total_tokens=300, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert (interrupted / HOOKS[1] / "notes.txt").read_text() == "mine"


def test_float16_caches_refuse_values_they_cannot_hold(tmp_path):
    big = id_rows(0, 10, 4)
    big[3, 1] = 70000.0  # above float16's 65504
    with pytest.raises(
        ValueError, match=r"'h\.a' reach \|x\| = 7e\+04, beyond float16's largest value.*bfloat16"
    ):
        write_cache(tmp_path / "f16", [big], dtype="float16")
    write_cache(tmp_path / "bf16", [big], dtype="bfloat16")  # float32's range: stored
    assert float(ActivationCache(tmp_path / "bf16").read_all("h.a")[3, 1]) == float(
        torch.tensor(7e4).bfloat16()
    )


def test_a_harvest_that_finds_no_rows_writes_no_cache(tmp_path):
    writer = CacheWriter(tmp_path / "empty", {"h.a": 4}, "float32", 100, {"test": 1})
    with pytest.raises(ValueError, match=r"found no rows to store: every document was empty or every token"):
        writer.finish({}, wall_seconds=0.0)
    assert not (tmp_path / "empty" / "manifest.json").exists()
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(FileExistsError, match=r"output_dir=.*afile is a file; give a folder path"):
        CacheWriter(tmp_path / "afile", {"h.a": 4}, "float32", 100, {"test": 1})


def test_eval_of_a_cache_trained_sae_reads_rows_it_never_trained_on(tmp_path):
    """Trained on rows [0, 6 * 64) of a cache's stream (column 0 is the row id), the SAE is evaluated from the
    first row past them at another batch size; when the pass has no such rows left, the report says so."""
    from saelab.eval import EvalConfig, evaluate
    from saelab.sae.registry import build_sae
    from saelab.sae.topk import TopKConfig
    from saelab.sources.harvested import CacheSource, CacheSourceConfig
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    write_cache(tmp_path / "c", [id_rows(0, 1000, 8)], shard_tokens=128)
    source = CacheSource(CacheSourceConfig(path=str(tmp_path / "c"), hook_name="h.a", group_tokens=256))
    sae = (
        Trainer(
            build_sae(TopKConfig(d_in=8, d_sae=32, k=2)),
            TrainerConfig(total_tokens=64 * 6, batch_size=64, device="cpu"),
        )
        .fit(source)
        .sae
    )
    trained = torch.cat(list(islice(source.batches(64), 6)))[:, 0]
    report = evaluate(
        sae, source, EvalConfig(total_tokens=300, batch_size=100, cooccurrence_latents=0)
    ).report
    assert report["data"] == {"start_batch": 4, "held_out": True}  # rows 400-699 of the stream
    read = torch.cat(list(islice(source.batches(100, 4), 3)))[:, 0]
    assert not torch.isin(read, trained).any()
    long = evaluate(sae, source, EvalConfig(total_tokens=700, batch_size=100, cooccurrence_latents=0)).report
    assert long["data"] == {"start_batch": 4, "held_out": False}  # rows past 1000 start the pass again
