"""A transcoder's (x, y) pairs stay together: through the cache reader's shuffling and resume, the trainer's
checkpoint / resume, a live model's mixing buffer (TransformerLens hooks and a Hugging Face module's input and
output), and the language-model evaluation that splices the prediction in. Each check would fail if x and y were
shuffled or cut independently (2-process data parallelism: tests/test_distributed.py)."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus
from test_trainer import StopAfter
from variants import D_OUT, pair_misfit, write_pair_cache

from saelab.eval.lm import LMEvaluator, logits_of, next_token_log_probs, special_mask, token_ce
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.module import ModuleHarvester
from saelab.harvest.pipeline import HarvestPipeline
from saelab.harvest.tlens import TransformerLensHarvester
from saelab.sae.transcoder import resolve_for_data, transcoder_class
from saelab.sources.harvested import CacheSource, CacheSourceConfig, ModelSource, transcoder_source_config
from saelab.splice import feature_activations
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def recording(forward, misfits: list[float], linear: torch.Tensor):
    """The trainer's forward, first recording the pair misfit of the rows it is given."""

    def checked(rows, ctx):
        misfits.append(pair_misfit(rows, linear))
        return forward(rows, ctx)

    return checked


def test_cache_rows_keep_their_pairs_through_shuffling_and_resume(tmp_path):
    linear = write_pair_cache(tmp_path / "cache")
    source = CacheSource(
        CacheSourceConfig(path=str(tmp_path / "cache"), hook_name="x", target_hook="y", seed=3)
    )
    assert (source.d_in, source.d_out, source.metadata()["hook_name_out"]) == (16, D_OUT, "y")
    batches = list(islice(source.batches(64, start_batch=0), 20))  # 1280 rows: more than two passes of 600
    rows = torch.cat(batches)
    assert pair_misfit(rows, linear) < 1e-5
    first_pass = rows[:600, 0]
    assert sorted(first_pass.tolist()) == list(range(600)) and first_pass.tolist() != list(range(600))
    resumed = list(islice(source.batches(64, start_batch=13), 7))  # a resumed run's stream
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[13:], strict=True))


def test_a_resumed_transcoder_trains_on_aligned_pairs_from_a_cache(tmp_path):
    linear = write_pair_cache(tmp_path / "cache")
    source = CacheSource(CacheSourceConfig(path=str(tmp_path / "cache"), hook_name="x", target_hook="y"))
    cfg = resolve_for_data(
        transcoder_class("topk", True).config_class(d_sae=32, k=4, skip_init="lstsq"),
        source.d_in,
        source.d_out,
    )
    trainer_cfg = TrainerConfig(
        total_tokens=16 * 64, batch_size=64, device="cpu", checkpoint_every=8, eval_every=0
    )
    misfits: list[float] = []
    cut = Trainer(transcoder_class("topk", True)(cfg), trainer_cfg, output_dir=tmp_path / "run")
    cut.forward = recording(cut.forward, misfits, linear)
    with pytest.raises(KeyboardInterrupt):
        cut.fit(StopAfter(source, 10))  # killed after step 10; last checkpoint at step 8
    resumed = Trainer.from_checkpoint(tmp_path / "run", trainer_cfg, output_dir=tmp_path / "run")
    assert resumed.step == 8
    resumed.forward = recording(resumed.forward, misfits, linear)
    result = resumed.fit(source)
    assert len(misfits) == 10 + 8 and max(misfits) < 1e-5
    # the skip term fitted to the first batch and trained since is the planted map (no map links misaligned rows)
    assert float((result.sae.W_skip.detach() - linear).abs().max()) < 0.05


def check_mlp_pairs(rows: torch.Tensor, mlp, d_in: int) -> None:
    """Each row's y is the MLP applied to its own x."""
    x, y = rows[:, :d_in], rows[:, d_in:]
    with torch.no_grad():
        want = mlp(x[:, None, :])[:, 0]
    assert float((y - want).norm() / y.norm()) < 1e-4
    assert float((y[1:] - want[:-1]).norm() / y.norm()) > 0.5  # a pairing shifted by one row is far off


def model_config(tmp_path, **fields) -> ModelSourceConfig:
    corpus = write_corpus(tmp_path / "corpus")
    return ModelSourceConfig(
        model="tiny", dataset=str(corpus), context_size=16, model_batch_size=4, buffer_tokens=256, **fields
    )


def test_a_live_model_source_keeps_pairs_through_the_mixing_buffer(tmp_path):
    model = tiny_tl(n_layers=2)
    cfg = model_config(tmp_path, hook_name=MLP_IN, target_hook=MLP_OUT)
    pipeline = HarvestPipeline.from_tokenizer(
        TransformerLensHarvester(model, [MLP_IN, MLP_OUT]), word_tokenizer(WORDS), cfg
    )
    source = ModelSource(cfg, torch.device("cpu"), pipeline=pipeline)
    assert (source.d_in, source.d_out, source.metadata()["hook_name_out"]) == (32, 32, MLP_OUT)
    rows = torch.cat(list(islice(source.batches(64), 6)))
    check_mlp_pairs(rows, model.blocks[0].mlp, 32)


def test_a_hugging_face_module_pairs_its_input_with_its_output(tmp_path):
    from test_harvest import tiny_llama

    model = tiny_llama()
    cfg = transcoder_source_config(model_config(tmp_path, backend="hf", hook_name="model.layers.1.mlp"))
    assert (cfg.hook_name, cfg.target_hook) == ("model.layers.1.mlp:input", "model.layers.1.mlp")
    harvester = ModuleHarvester(model, [cfg.hook_name, cfg.target_hook])
    pipeline = HarvestPipeline.from_tokenizer(harvester, word_tokenizer(WORDS), cfg)
    source = ModelSource(cfg, torch.device("cpu"), pipeline=pipeline)
    rows = torch.cat(list(islice(source.batches(64), 4)))
    check_mlp_pairs(rows, model.model.layers[1].mlp, source.d_in)
    with pytest.raises(ValueError, match=r"source\.target_hook is empty: .*blocks\.6\.hook_mlp_out"):
        transcoder_source_config(model_config(tmp_path / "tl", hook_name=MLP_IN))


def test_lm_evaluation_splices_the_prediction_at_the_target_hook(tmp_path):
    """CE with the transcoder's prediction of the MLP output from the MLP input, and with the output
    mean-ablated, equal the same substitutions made by hand with TransformerLens hooks."""
    model = tiny_tl(n_layers=2)
    cls = transcoder_class("relu", True)
    sae = cls(cls.config_class(d_in=32, d_out=32, d_sae=64, metadata={"hook_name_out": MLP_OUT}))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.1)
    tokens = torch.randint(3, 3 + len(WORDS), (3, 12))
    tokens[:, 0] = 0
    special = [0, 1, 2]
    lm = LMEvaluator(model, sae, MLP_IN, special)
    batch = lm.update(tokens)
    report = lm.compute()
    keep = ~special_mask(tokens, special)
    counted = keep[:, :-1] & keep[:, 1:]
    captured = {}

    def run(replace) -> float:
        hooks = [
            (MLP_IN, lambda act, hook: captured.update(x=act)),
            (MLP_OUT, lambda act, hook: replace(act)),
        ]
        with model.hooks(fwd_hooks=hooks), torch.no_grad():
            ce = token_ce(next_token_log_probs(logits_of(model(tokens))), tokens)
        return float(ce[counted].double().mean())

    def predicted(act):
        return torch.where(keep[..., None], sae(captured["x"]), act)

    def mean_ablated(act):
        return torch.where(keep[..., None], act[keep].mean(0), act)

    assert report["ce_sae"] == pytest.approx(run(predicted), rel=1e-5)
    assert report["ce_mean"] == pytest.approx(run(mean_ablated), rel=1e-5)
    assert report["ce_clean"] == pytest.approx(run(lambda act: act), rel=1e-6)
    gap = report["ce_mean"] - report["ce_clean"]
    assert report["ce_loss_score_mean"] == pytest.approx((report["ce_mean"] - report["ce_sae"]) / gap)
    with torch.no_grad():  # the rows evaluated are the target's and the prediction's at kept positions
        _, cache = model.run_with_cache(tokens, names_filter=[MLP_IN, MLP_OUT])
        torch.testing.assert_close(batch.x, cache[MLP_OUT][keep])
        torch.testing.assert_close(batch.x_hat, sae(cache[MLP_IN][keep]))
        codes = feature_activations(model, sae, MLP_IN, tokens)
        torch.testing.assert_close(codes, sae.encode(cache[MLP_IN]))


def test_inspect_reads_a_transcoder_at_its_input_and_its_decoder_at_the_output():
    """Latent statistics come from the codes of the MLP's input; logit effects from the decoder rows, which
    live in the output (residual) space: centred W_dec rows (the final norm is a LayerNorm) @ diag(ln_final.w) @ W_U."""
    from saelab.inspect import InspectConfig, collect_features

    model = tiny_tl(n_layers=2)
    cls = transcoder_class("relu", False)
    metadata = {"hook_name": MLP_IN, "hook_name_out": MLP_OUT}
    sae = cls(cls.config_class(d_in=32, d_out=32, d_sae=48, metadata=metadata))
    tokens = torch.randint(3, 3 + len(WORDS), (6, 12), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0
    cfg = InspectConfig(total_tokens=66, batch_size=6, n_logit_tokens=3)
    data = collect_features(model, sae, tokens, excluded_ids=[0, 1, 2], cfg=cfg)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[MLP_IN])
        z = sae.encode(cache[MLP_IN][tokens >= 3])
        rows = sae.W_dec - sae.W_dec.mean(dim=1, keepdim=True)
        logits = rows @ (model.ln_final.w[:, None] * model.W_U)
    assert data.hook_name == MLP_IN and data.n_tokens == 66
    assert torch.equal(data.fire_count, (z > 0).sum(0))
    torch.testing.assert_close(data.promoted_logits, logits.topk(3, dim=1).values)
