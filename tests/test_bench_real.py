"""scripts/bench_real.py on a tiny TransformerLens model: both libraries train from the cache, and the held-out
figures are those of the text after the cache, checked against sparsify's own forward pass."""

import sys
from pathlib import Path

import pytest
import torch
from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

from saelab.app.config import HarvestRunConfig
from saelab.app.harvest_job import run_harvest
from saelab.eval.config import EvalConfig
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import HarvestPipeline
from saelab.harvest.tlens import TransformerLensHarvester
from saelab.sources.harvested import CacheSource, CacheSourceConfig, ModelSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_real  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def test_both_libraries_train_equal_tokens_and_are_evaluated_on_text_after_the_cache(tmp_path):
    cpu = torch.device("cpu")
    model, tokenizer = tiny_tl(n_layers=2), word_tokenizer(WORDS)
    src = ModelSourceConfig(
        model="tiny", hook_name=HOOK, dataset=str(write_corpus(tmp_path / "corpus", n_docs=40)),
        context_size=16, model_batch_size=4,
    )  # fmt: skip
    pipeline = HarvestPipeline.from_tokenizer(TransformerLensHarvester(model, [HOOK]), tokenizer, src)
    harvest = HarvestRunConfig(
        source=src, output_dir=str(tmp_path / "cache"), total_tokens=512, progress=False
    )
    manifest = run_harvest(harvest, pipeline)
    cache = CacheSource(CacheSourceConfig(path=str(tmp_path / "cache")))
    shape = bench_real.Shape(d_in=32, latents=64, k=4, batch=128, steps=4)
    name, overrides = bench_real.benchutil.parse_variant("half:lr_mult=0.5,dead_window_tokens=256")
    runs = {"saelab": ("saelab", {}), "sparsify": ("sparsify", {}), f"saelab[{name}]": ("saelab", overrides)}
    trained = bench_real.train_shape(shape, runs, cache, tmp_path / "saes", 2, init_seed=1, device=cpu)
    assert set(trained) == set(runs)
    assert trained["saelab"]["lr"] > 0 and 0 <= trained["saelab"]["own_dead"] <= 1
    assert trained["saelab[half]"]["lr"] == pytest.approx(trained["saelab"]["lr"] / 2)
    assert (tmp_path / "saes" / "x2" / "saelab[half]" / "cfg.json").is_file()

    start = bench_real.heldout_start_batch(cache.cache, lm_batch_size=4)
    assert 0 <= 4 * start - manifest["contexts"] < 4  # the first LM batch after every harvested context
    source = ModelSource(src, cpu, pipeline=pipeline)
    rows = bench_real.heldout_rows(source, 4 * start, 200)
    # Reference: the hook's activations on the contexts after the harvest, from TransformerLens directly.
    tokens = torch.cat(list(pipeline.contexts.batches(4, skip=4 * start)))
    with torch.no_grad():
        _, acts = model.run_with_cache(tokens, names_filter=[HOOK])
    keep = ~torch.isin(tokens, pipeline.excluded)
    torch.testing.assert_close(rows, acts[HOOK][keep][:200])

    eval_cfg = EvalConfig(
        total_tokens=100, lm_batch_size=4, start_batch=start, cooccurrence_latents=0, plots=False
    )
    result = bench_real.evaluate_saved(tmp_path / "saes" / "x2" / "sparsify", source, eval_cfg, rows, cpu)
    # Reference: sparsify's own load and forward pass on the same rows, FVU in float64.
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(tmp_path / "saes" / "x2" / "sparsify", device="cpu")
    with torch.no_grad():
        out = coder(rows)
    x, x_hat = rows.double(), out.sae_out.double()
    want_fvu = ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()
    fired = out.latent_indices[out.latent_acts > 0].unique()
    assert result["fvu_wide"] == pytest.approx(want_fvu, rel=1e-4)
    assert result["dead_wide"] == pytest.approx(1 - fired.numel() / 64)
    assert result["eval_tokens"] == 100 and result["l0"] <= 4

    saelab_result = bench_real.evaluate_saved(
        tmp_path / "saes" / "x2" / "saelab", source, eval_cfg, None, cpu
    )
    assert saelab_result["eval_tokens"] == 100 and "dead_wide" not in saelab_result


def test_variant_text_sets_typed_fields_and_rejects_unknown_ones():
    name, overrides = bench_real.benchutil.parse_variant(
        "w:dead_window_tokens=4096,aux_k_coef=0.125,lr_mult=2"
    )
    assert name == "w"
    assert overrides == {"dead_window_tokens": 4096, "aux_k_coef": 0.125, "lr_mult": 2}
    assert isinstance(overrides["dead_window_tokens"], int)
    with pytest.raises(SystemExit, match="'dead_window'"):
        bench_real.benchutil.parse_variant("w:dead_window=4096")


@pytest.mark.parametrize("ablation", ["untied", "unscaled", "mean_bias"])
def test_init_ablations_change_only_what_they_name(ablation):
    from saelab.core.seeds import generator
    from saelab.sae.topk import TopKConfig

    benchutil = bench_real.benchutil
    first = torch.randn(256, 16, generator=generator(3, "test.first")) * 2 + 1
    topk = TopKConfig(d_in=16, d_sae=64, k=4)

    def build(overrides):
        return benchutil.saelab_topk_trainer(
            topk, 4096, 256, torch.device("cpu"), overrides, first, generator(5, "test.init")
        ).sae

    base, sae = build({}), build({"init": ablation})
    scale = base.W_enc.norm(dim=0)  # the least-squares factor, the same for every tied column
    torch.testing.assert_close(scale, torch.full_like(scale, scale[0].item()))
    torch.testing.assert_close(sae.W_dec, base.W_dec)
    if ablation == "untied":
        torch.testing.assert_close(sae.W_enc.norm(dim=0), scale)
        cosine = torch.nn.functional.cosine_similarity(sae.W_enc.T, base.W_dec, dim=1)
        assert cosine.abs().max() < 0.95  # independent directions, not the decoder's
    if ablation == "unscaled":
        torch.testing.assert_close(sae.W_enc, base.W_dec.T)
    if ablation == "mean_bias":
        x = first.double()
        want = x.mean(0) * (16**0.5 / x.norm(dim=1).mean())  # rows scaled to E||x|| = sqrt(d_in)
        torch.testing.assert_close(sae.b_dec.double(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.W_enc, base.W_enc)
    else:
        torch.testing.assert_close(sae.b_dec, base.b_dec)


def test_bench_reports_name_the_kernel_choices_set_in_the_environment(tmp_path, monkeypatch, capsys):
    """A GPU figure taken with SAELAB_SPARSE_ROWS=autocast says so in its JSON; unset choices are left out."""
    import json

    for name in bench_real.benchutil.CHOICES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAELAB_SPARSE_ROWS", "autocast")
    path = tmp_path / "report.json"
    bench_real.benchutil.write_report(str(path), "demo", torch.device("cpu"), ms=1.5)
    report = json.loads(path.read_text())
    assert report["kernel_env"] == {"SAELAB_SPARSE_ROWS": "autocast"}
    assert report["benchmark"] == "demo" and report["ms"] == 1.5
    assert json.loads(capsys.readouterr().out) == report
