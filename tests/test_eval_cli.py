"""`saelab eval` end to end, and the trainer's periodic held-out evaluation."""

import json
from itertools import islice

import pytest
import torch

from saelab.app.cli import main
from saelab.eval import EvalConfig, evaluate
from saelab.sae import available_architectures, get_sae_class
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.pairs import PairsConfig, PairsSource
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fvu64(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


class FakeRunLogger:
    """Stands in for the wandb-backed RunLogger: records what the eval command logs."""

    calls: list = []

    def __init__(self, cfg, total_steps, run_config, output_dir):
        self.wandb_run = self
        FakeRunLogger.calls.append(("init", cfg.wandb_mode))

    def summary(self, values):
        FakeRunLogger.calls.append(("summary", values))

    def log(self, values):
        FakeRunLogger.calls.append(("log", values))

    def close(self):
        FakeRunLogger.calls.append(("close", None))


def test_saelab_eval_writes_report_and_plots_and_logs_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setattr("saelab.app.eval_job.RunLogger", FakeRunLogger)
    torch.manual_seed(123)  # not the source's seed: random rows must not equal its features
    source = SyntheticSource(SyntheticConfig())
    sae = TopKSAE(TopKConfig(d_in=64, d_sae=128, k=8))
    with torch.no_grad():  # half the latents are the planted features: recovery is known exactly
        sae.W_dec[:64] = source.features[:64]
    sae.save(tmp_path / "sae")
    out = tmp_path / "report"
    main([
        "eval", f"sae={tmp_path / 'sae'}", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}",
        "eval.total_tokens=5000", "eval.batch_size=2048", "eval.start_batch=7", "eval.cooccurrence_latents=64",
        "logging.progress=false", "logging.wandb_mode=offline",
    ])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["tokens"] == 5000
    x = torch.cat(list(islice(source.batches(2048, start_batch=7), 3)))[:5000]
    with torch.no_grad():
        want = fvu64(x, sae(x))
    assert report["reconstruction"]["fvu"] == pytest.approx(want, rel=1e-6)
    assert report["recovery"]["frac_recovered"] == pytest.approx(64 / source.cfg.n_features)
    for key in ("dead_frac", "density_histogram"):
        assert key in report["dead"]
    assert report["geometry"]["n_duplicate_pairs"] == 0
    assert report["cooccurrence"]["n_latents"] > 0
    for name in ("density.png", "spectrum.png", "cosine.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    calls = dict(FakeRunLogger.calls)
    assert calls["init"] == "offline" and "close" in calls
    assert calls["summary"]["eval/reconstruction/fvu"] == report["reconstruction"]["fvu"]
    assert sorted(calls["log"]) == ["eval/cosine", "eval/density", "eval/frontier_position", "eval/spectrum"]
    assert (out / "report.html").is_file()


def test_saelab_eval_rejects_a_missing_sae_and_a_wrong_width(tmp_path, capsys):
    common = [f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}", "logging.progress=false"]
    with pytest.raises(SystemExit):
        main(["eval", f"sae={tmp_path}", *common])
    assert "cfg.json is missing" in capsys.readouterr().err
    TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)).save(tmp_path / "sae32")
    with pytest.raises(SystemExit):
        main(["eval", f"sae={tmp_path / 'sae32'}", *common])
    assert "SAE has d_in=32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trainer_periodic_eval_on_held_out_batches():
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=48, mean_active=3))
    starts = []
    original = source.batches

    def recording(batch_size, start_batch=0):
        starts.append(start_batch)
        return original(batch_size, start_batch)

    source.batches = recording
    cfg = TrainerConfig(
        total_tokens=256 * 12, batch_size=256, device="cpu", eval_every=5, eval_batches=2, lr=3e-3
    )
    torch.manual_seed(0)
    result = Trainer(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)), cfg).fit(source)
    assert sorted(starts) == [0, 2]  # held-out batches 0-1; training starts at batch 2
    assert [row["step"] for row in result.eval_history] == [5.0, 10.0, 12.0]
    held = list(islice(original(256, 0), 2))
    with torch.no_grad():  # the final row used the final weights; FVU is unchanged by the folded input scale
        want = fvu64(torch.cat(held), result.sae(torch.cat(held)))
        codes = [result.sae.encode(x) for x in held]
    final = result.eval_history[-1]
    assert final["heldout/fvu"] == pytest.approx(want, rel=1e-4)
    assert final["heldout/l0"] == pytest.approx(4.0)
    silent = ~torch.cat(codes).ne(0).any(dim=0)
    assert final["heldout/dead_frac"] == pytest.approx(silent.double().mean().item())
    assert result.eval_history[0]["heldout/fvu"] > final["heldout/fvu"]


@pytest.mark.parametrize("arch", sorted({get_sae_class(a).architecture for a in available_architectures()}))
def test_evaluate_runs_on_every_variant(arch):
    """Streamed FVU and L0 of each registered variant equal float64 formulas on the same rows (a transcoder's: of
    its prediction of y, skip term included, on planted pairs)."""
    torch.manual_seed(5)
    cls = get_sae_class(arch)
    sae = cls(cls.config_class(d_in=16, d_sae=64, **({"d_out": 12} if cls.is_transcoder else {}))).eval()
    with torch.no_grad():
        threshold = getattr(sae, "threshold", None)
        if threshold is not None and bool(threshold.isnan().any()):
            threshold.fill_(0.1)  # BatchTopK has no inference threshold before training
        if cls.is_transcoder and cls.has_skip:
            sae.W_skip.normal_(0, 0.1)
    if cls.is_transcoder:
        source = PairsSource(PairsConfig(d_in=16, d_out=12, n_features=32, mean_active=3))
    else:
        source = SyntheticSource(SyntheticConfig(d_in=16, n_features=32, mean_active=3))
    report = evaluate(
        sae, source, EvalConfig(total_tokens=1000, batch_size=512, cooccurrence_latents=0)
    ).report
    rows = torch.cat(list(islice(source.batches(512), 2)))[:1000]
    x, target = rows[:, :16], rows[:, 16:] if cls.is_transcoder else rows
    with torch.no_grad():
        z = sae.encode(x)
        skip = x @ sae.W_skip.T if cls.is_transcoder and cls.has_skip else 0.0
        want_fvu = fvu64(target, sae.decode(z) + skip)
    assert report["tokens"] == 1000
    assert report["reconstruction"]["fvu"] == pytest.approx(want_fvu, rel=1e-5)
    assert report["reconstruction"]["l0"] == pytest.approx((z != 0).sum(1).double().mean().item())


def test_lm_eval_evaluates_exactly_total_tokens_and_the_dead_window_is_them(tmp_path):
    """A budget that ends inside a token batch: exactly that many non-special positions are evaluated
    (reconstruction, codes, CE predictions), and the default dead window is those tokens."""
    from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

    from saelab.harvest.config import ModelSourceConfig
    from saelab.harvest.pipeline import HarvestPipeline
    from saelab.harvest.tlens import TransformerLensHarvester
    from saelab.sources.harvested import ModelSource

    hook = "blocks.0.hook_resid_post"
    cfg = ModelSourceConfig(
        model="tiny", hook_name=hook, dataset=str(write_corpus(tmp_path / "corpus")), context_size=16,
        model_batch_size=4, buffer_tokens=256,
    )  # fmt: skip
    model = tiny_tl(n_layers=2)
    pipeline = HarvestPipeline.from_tokenizer(
        TransformerLensHarvester(model, [hook]), word_tokenizer(WORDS), cfg
    )
    source = ModelSource(cfg, torch.device("cpu"), pipeline=pipeline)
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)).eval()
    budget = 100
    report = evaluate(
        sae, source, EvalConfig(total_tokens=budget, lm_batch_size=4, cooccurrence_latents=0)
    ).report
    tokens = torch.cat(list(islice(pipeline.contexts.batches(4), 2)))  # 2 batches hold more than the budget
    special = torch.isin(tokens, pipeline.excluded)
    assert int((~special[:4]).sum()) < budget < int((~special).sum())
    order = (~special).reshape(-1).long().cumsum(0).reshape(special.shape)
    evaluated = ~special & (order <= budget)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        x = cache[hook][evaluated]
        want_fvu = fvu64(x, sae(x))
    assert report["tokens"] == budget and report["dead"]["window_tokens"] == budget
    assert report["reconstruction"]["fvu"] == pytest.approx(want_fvu, rel=1e-5)
    assert report["lm"]["predictions"] == int((evaluated[:, :-1] & ~special[:, 1:]).sum())


def test_flatten_report_keeps_the_numeric_leaves_under_slash_joined_names():
    from saelab.eval.evaluate import flatten_report

    report = {"recon": {"fvu": 0.25, "note": "x", "ok": True, "dead": {"frac": 3}}, "l0": 7, "hist": [1, 2]}
    assert flatten_report(report) == {"recon/fvu": 0.25, "recon/dead/frac": 3, "l0": 7}
    assert flatten_report({"a": 1.5}, prefix="eval/") == {"eval/a": 1.5}


def test_eval_reads_past_the_training_batches_of_its_own_synthetic_source_and_refuses_another(tmp_path):
    """An SAE trained on batches 2-9 of a synthetic source (0-1 held out by the trainer) is evaluated from batch
    10 by default (its step-4 checkpoint from batch 6): the rows it never saw, whatever the eval's batch size.
    Another seed is refused."""
    from saelab import load_sae

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=48, mean_active=3, seed=4))
    cfg = TrainerConfig(
        total_tokens=256 * 8, batch_size=256, device="cpu", eval_every=4, eval_batches=2, checkpoint_every=4
    )
    torch.manual_seed(0)
    sae = Trainer(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)), cfg, output_dir=tmp_path).fit(source).sae
    checkpoint = load_sae(tmp_path / "checkpoints" / "step_000000004")
    assert checkpoint.cfg.metadata["training_batches"] == {"start": 2, "end": 6, "batch_size": 256}
    assert sae.cfg.metadata["training_batches"] == {"start": 2, "end": 10, "batch_size": 256}
    small = EvalConfig(total_tokens=300, batch_size=100, cooccurrence_latents=0)
    report = evaluate(sae, source, small).report
    assert report["data"] == {"start_batch": 10, "held_out": True}
    assert evaluate(checkpoint, source, small).report["data"] == {"start_batch": 6, "held_out": True}
    x = torch.cat([source.batch(i, 100) for i in (10, 11, 12)])  # the rows it must have read
    with torch.no_grad():
        assert report["reconstruction"]["fvu"] == pytest.approx(fvu64(x, sae(x)), rel=1e-5)
    explicit = evaluate(sae, source, EvalConfig(**{**small.__dict__, "start_batch": 3})).report
    assert explicit["data"] == {"start_batch": 3, "held_out": False}  # batch 3 was trained on: said so
    other = SyntheticSource(SyntheticConfig(d_in=16, n_features=48, mean_active=3, seed=5))
    with pytest.raises(
        ValueError, match=r"trained on a synthetic source with source\.seed=4, .* has source\.seed=5"
    ):
        evaluate(sae, other, small)
    unknown = evaluate(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)), source, small).report  # no record
    assert unknown["data"] == {"start_batch": 0, "held_out": None}


def test_eval_dead_window_longer_than_the_data_counts_latents_silent_throughout():
    torch.manual_seed(2)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=256, k=1)).eval()
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=8, mean_active=1))
    report = evaluate(
        sae,
        source,
        EvalConfig(total_tokens=512, batch_size=256, dead_window_tokens=100_000, cooccurrence_latents=0),
    ).report["dead"]
    x = torch.cat(list(islice(source.batches(256), 2)))
    with torch.no_grad():
        silent = ~sae.encode(x).ne(0).any(dim=0)
    assert silent.double().mean().item() > 0.1  # some latents never fire on these 512 rows
    assert report["window_tokens"] == 512
    assert report["dead_frac"] == pytest.approx(silent.double().mean().item())


def recording_model_source(folder, n_docs: int):
    """A live model source (1-layer TransformerLens model, word tokenizer) over n_docs random text files:
    contexts of 16 tokens, model batches of 4, a 128-row mixing buffer. It records, per stream it made
    (`batches` call), the token contexts the model ran on, in order: `source.reads[stream]`."""
    from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

    from saelab.harvest.config import ModelSourceConfig
    from saelab.harvest.pipeline import HarvestPipeline
    from saelab.harvest.tlens import TransformerLensHarvester
    from saelab.sources.harvested import ModelSource

    class RecordingSource(ModelSource):
        def batches(self, *args, **kwargs):
            stream = super().batches(*args, **kwargs)

            def tagged(batches=stream._batches):  # numbered when it first runs; the reader while it runs
                number = len(self.reads)
                self.reads.append([])
                while True:
                    self.active = number
                    x = next(batches, None)
                    if x is None:
                        return
                    yield x

            stream._batches = tagged()
            return stream

    class RecordingHarvester:
        def __init__(self, inner):
            self.inner, self.device, self.model = inner, inner.device, inner.model

        def __call__(self, tokens):
            source.reads[source.active] += map(tuple, tokens.tolist())
            return self.inner(tokens)

    hook = "blocks.0.hook_resid_post"
    cfg = ModelSourceConfig(
        model="tiny", hook_name=hook, dataset=str(write_corpus(folder, n_docs=n_docs)), context_size=16,
        model_batch_size=4, buffer_tokens=128,
    )  # fmt: skip
    pipeline = HarvestPipeline.from_tokenizer(
        TransformerLensHarvester(tiny_tl(n_layers=1), [hook]), word_tokenizer(WORDS), cfg
    )
    source = RecordingSource(cfg, torch.device("cpu"), pipeline=pipeline)
    source.reads = []
    pipeline.harvester = RecordingHarvester(pipeline.harvester)
    return source


def text_of(source) -> list[tuple[int, ...]]:
    """One pass over the source's text: its token contexts, in order."""
    return [tuple(context) for context in source.pipeline.contexts.contexts()]


def test_eval_of_a_model_trained_sae_starts_on_text_training_did_not_read(tmp_path):
    """Trained on 4 batches of 64 rows of a live model source, the SAE's evaluation starts past every context
    the training stream read (the model batches it ran, recorded); when the run read more than the whole text,
    nothing is held out and the report says so."""
    source = recording_model_source(tmp_path / "corpus", n_docs=40)
    text = text_of(source)
    trainer_cfg = TrainerConfig(total_tokens=64 * 4, batch_size=64, device="cpu")
    torch.manual_seed(0)
    sae = Trainer(TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)), trainer_cfg).fit(source).sae
    (read,) = source.reads
    assert read == text[: len(read)] and len(read) < len(text)  # the start of the text, in order, not all
    small = EvalConfig(total_tokens=64, lm_batch_size=4, cooccurrence_latents=0)
    report = evaluate(sae, source, small).report
    assert report["data"] == {"start_batch": -(-len(read) // 4), "held_out": True}
    long_cfg = TrainerConfig(total_tokens=64 * 40, batch_size=64, device="cpu")  # more rows than the text
    long = Trainer(TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)), long_cfg).fit(source).sae
    assert evaluate(long, source, small).report["data"] == {"start_batch": 0, "held_out": False}


def test_held_out_text_of_a_live_model_source_stays_out_of_training_when_the_text_repeats(tmp_path):
    """A run that reads its text several times never trains on the contexts of its held-out batches: every
    pass after the first skips them. Reference: the token contexts the model ran on for each stream."""
    source = recording_model_source(tmp_path / "corpus", n_docs=12)
    text = text_of(source)
    cfg = TrainerConfig(total_tokens=64 * 30, batch_size=64, device="cpu", eval_every=10, eval_batches=2)
    torch.manual_seed(0)
    Trainer(TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)), cfg).fit(source)
    held, trained = source.reads
    reserved = source.contexts_before(
        2, 64
    )  # what the held-out stream can read: 128 rows, buffer, model batch
    assert len(held) >= 4 and set(held) <= set(text[:reserved]) and reserved < len(text) / 2
    assert set(trained) == set(text[reserved:])  # training read the rest of the text, never the held-out part
    assert len(trained) > 2 * len(text)  # ... at least twice


def test_a_resumed_model_source_run_reads_no_text_its_checkpointed_run_had_read(tmp_path, monkeypatch):
    """Resumed from its step-4 checkpoint, a run starts in the text after every context the first run had read
    by then (recorded in the checkpoint), and its held-out text stays out; the final SAE's evaluation starts
    past all of it. Reference: the contexts the model ran on, per stream."""
    source = recording_model_source(tmp_path / "corpus", n_docs=40)
    text = text_of(source)
    cfg = TrainerConfig(
        total_tokens=64 * 8, batch_size=64, device="cpu", eval_every=4, eval_batches=1, checkpoint_every=4
    )
    read_by_checkpoint = []
    save = Trainer.save_checkpoint

    def noting_save(trainer):
        read_by_checkpoint.append(list(source.reads[1]))
        return save(trainer)

    monkeypatch.setattr(Trainer, "save_checkpoint", noting_save)
    torch.manual_seed(0)
    Trainer(TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)), cfg, output_dir=tmp_path / "first").fit(source)
    checkpoint = tmp_path / "first" / "checkpoints" / "step_000000004"
    resumed = Trainer.from_checkpoint(checkpoint, cfg, output_dir=tmp_path / "second")
    sae = resumed.fit(source).sae
    held, first, held_again, second = source.reads
    assert held_again == held and not set(held) & set(first + second)
    assert read_by_checkpoint[0] and not set(read_by_checkpoint[0]) & set(second)  # none of it read again
    last = max(text.index(context) for context in second)
    assert last < len(text) - 4  # the runs did not reach the end of the text
    small = EvalConfig(total_tokens=64, lm_batch_size=4, cooccurrence_latents=0)
    report = evaluate(sae, source, small).report
    assert report["data"]["held_out"] is True and report["data"]["start_batch"] * 4 > last


def test_runs_and_saes_from_before_the_text_count_use_a_bound_past_what_training_read(tmp_path):
    """A checkpoint and an SAE that do not record `contexts_read` (written before the trainer counted the text):
    the resume and the evaluation start past a bound that counts the read-ahead of both the held-out and the
    training stream. Reference: the contexts the model ran on."""
    from saelab.io.layout import STATE_FILE

    source = recording_model_source(tmp_path / "corpus", n_docs=40)
    text = text_of(source)
    cfg = TrainerConfig(
        total_tokens=64 * 8, batch_size=64, device="cpu", eval_every=4, eval_batches=1, checkpoint_every=4
    )
    torch.manual_seed(0)
    sae = (
        Trainer(TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)), cfg, output_dir=tmp_path / "first")
        .fit(source)
        .sae
    )
    held, first = source.reads
    sae.cfg.metadata["training_batches"].pop("contexts_read")
    report = evaluate(
        sae, source, EvalConfig(total_tokens=64, lm_batch_size=4, cooccurrence_latents=0)
    ).report
    assert report["data"]["held_out"] is True
    assert report["data"]["start_batch"] * 4 > max(text.index(context) for context in first)
    checkpoint = tmp_path / "first" / "checkpoints" / "step_000000004"
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    read_at_checkpoint = state.pop("contexts_read")
    torch.save(state, checkpoint / STATE_FILE)
    Trainer.from_checkpoint(checkpoint, cfg, output_dir=tmp_path / "second").fit(source)
    _, second = source.reads[2:]
    assert min(text.index(context) for context in second) >= read_at_checkpoint
