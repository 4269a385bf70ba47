"""SAEs trained together on one activation stream (saelab.train.together, hydra/launcher=together).

The reference for every job is the same job trained alone: its SAE built as `saelab train` builds it and
`Trainer.fit` on the source of its hook. Jobs stepping alone must match it bit for bit; same-shape TopK SAEs
stepped as one stack to float rounding. Sources: planted features (every variant, mixed widths, a stack), a
two-hook cache and a live TransformerLens model (two hooks, one forward pass per model batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from variants import small_configs

from saelab import load_sae
from saelab.app.cli import check_not_multirun_under_torchrun, main
from saelab.buffer.cache import CacheWriter
from saelab.core.seeds import generator
from saelab.sae import build_sae
from saelab.sae.batchtopk import BatchTopKConfig
from saelab.sae.relu import ReLUConfig
from saelab.sae.topk import TopKConfig
from saelab.sources.harvested import CacheSource, CacheSourceConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train import stacked
from saelab.train.config import TrainerConfig
from saelab.train.together import JobFailure, TogetherJob, assign_ranks, train_together
from saelab.train.trainer import Trainer, TrainResult

REPO = Path(__file__).resolve().parents[1]
SOURCE = SyntheticConfig(d_in=16, n_features=48, mean_active=3.0, seed=1)
BATCH, STEPS = 64, 12


def trainer_cfg(**fields) -> TrainerConfig:
    """A short run whose dead window (2 batches) switches AuxK on, with held-out evaluation and checkpoints."""
    base = dict(
        total_tokens=STEPS * BATCH, batch_size=BATCH, device="cpu", lr=3e-3, adam_eps=1e-6, log_every=4,
        dead_window_tokens=2 * BATCH, dead_check_every=2, eval_every=6, eval_batches=2, checkpoint_every=4,
    )  # fmt: skip
    return TrainerConfig(**{**base, **fields})


def alone(sae_cfg, cfg: TrainerConfig, source, output_dir: Path | None = None) -> TrainResult:
    """The job trained on its own, its SAE built as `saelab train` builds it."""
    resolved = sae_cfg.resolved(source.d_in)
    resolved = dataclasses.replace(resolved, metadata={**source.metadata(), **resolved.metadata})
    return Trainer(build_sae(resolved, generator(cfg.seed, "sae.init")), cfg, output_dir=output_dir).fit(
        source
    )


def assert_same_run(got: TrainResult, want: TrainResult, exact: bool) -> None:
    """Same final SAE, logged rows, held-out rows and final figures (bit for bit, or to float rounding)."""
    assert isinstance(got, TrainResult), got
    for name, value in want.sae.state_dict().items():
        if exact:
            assert torch.equal(got.sae.state_dict()[name], value), name
        else:
            torch.testing.assert_close(got.sae.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    rows = [(got.history, want.history), (got.eval_history, want.eval_history)]
    for got_rows, want_rows in rows:
        assert len(got_rows) == len(want_rows) > 0
        for row, ref in zip(got_rows, want_rows, strict=True):
            ref = {k: v for k, v in ref.items() if k != "tokens_per_s"}
            assert {k: row[k] for k in ref} == (ref if exact else pytest.approx(ref, rel=1e-4, abs=1e-6))
    assert got.sae.cfg.metadata["training_batches"] == want.sae.cfg.metadata["training_batches"]
    assert got.input_scale == want.input_scale and got.steps == want.steps


def test_every_variant_trained_together_equals_its_run_alone(tmp_path, monkeypatch):
    """Every trainable variant at mixed widths, plus three same-shape TopK SAEs (other lr, seed, AuxK weight)
    that step as one stack; checkpoints of every job at the same steps, pruned to trainer.keep_checkpoints."""
    source = SyntheticSource(SOURCE)
    cases = small_configs(
        {"d_in": 0, "d_sae": 64},
        relu={"d_sae": 48, "l1_coefficient": 1.0},
        gba={"n_groups": 4, "update_every": 5},
        batchtopk={"d_sae": 32},
        mp={"d_sae": 32},
        topk={"d_sae": 128},  # wide enough for latents to die within the 2-batch window: AuxK runs
    )
    jobs = [(cfg, trainer_cfg(), None) for cfg in cases.values()]
    stack = [
        (TopKConfig(d_sae=128, k=4), trainer_cfg(lr=1e-3, seed=5), None),
        (TopKConfig(d_sae=128, k=4, aux_k=4, aux_k_coef=0.1), trainer_cfg(lr_warmup_frac=0.2), None),
    ]
    jobs += stack
    steps = []
    monkeypatch.setattr(stacked.TopKStack, "train_step", record_calls(stacked.TopKStack.train_step, steps))
    outs = [tmp_path / f"job{i}" for i in range(len(jobs))]
    results = train_together(
        [TogetherJob(*job, output_dir=out) for job, out in zip(jobs, outs, strict=True)], source, stack="on"
    )
    assert [len(stack.trainers) for stack in steps[:1]] == [3] and len(steps) == STEPS  # one stack of 3 TopK
    names = list(cases) + ["topk"] * len(stack)
    for name, (sae_cfg, cfg, _), result, out in zip(names, jobs, results, outs, strict=True):
        reference = alone(sae_cfg, cfg, source)
        assert_same_run(result, reference, exact=name != "topk")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000004", "step_000000008"]
        assert load_sae(out / "sae").cfg.d_sae == reference.sae.cfg.d_sae
    for result in [results[list(cases).index("topk")], *results[len(cases) :]]:
        assert any(row.get("auxk", 0) > 0 for row in result.history)  # AuxK ran inside the stack


def record_calls(method, calls: list):
    def wrapped(self, *args, **kwargs):
        calls.append(self)
        return method(self, *args, **kwargs)

    return wrapped


def test_jobs_on_two_hooks_of_a_cache_equal_their_runs_alone(tmp_path):
    """A two-hook cache (widths 16 and 24): each hook's rows read once per step, every job as alone."""
    cache = tmp_path / "cache"
    streams = {
        "a": SyntheticSource(SOURCE),
        "b": SyntheticSource(dataclasses.replace(SOURCE, d_in=24, seed=7)),
    }
    writer = CacheWriter(cache, {"a": 16, "b": 24}, "float32", shard_tokens=512, fingerprint={"test": 2})
    for i in range(8):
        writer.add({h: s.batch(i, 512) for h, s in streams.items()}, torch.zeros(512, dtype=torch.long), 4)
    writer.finish({"a": {"hook_name": "a"}, "b": {"hook_name": "b"}}, wall_seconds=0.0)
    source = CacheSource(CacheSourceConfig(path=str(cache), hook_name="a", group_tokens=1024))
    jobs = [
        (TopKConfig(d_sae=64, k=4), trainer_cfg(checkpoint_every=0), "a"),
        (ReLUConfig(d_sae=48, l1_coefficient=1.0), trainer_cfg(checkpoint_every=0), "b"),
        (BatchTopKConfig(d_sae=32, k=2), trainer_cfg(checkpoint_every=0, lr=1e-3), "b"),
    ]
    results = train_together(jobs, source)
    for (sae_cfg, cfg, hook), result in zip(jobs, results, strict=True):
        solo = CacheSource(CacheSourceConfig(path=str(cache), hook_name=hook, group_tokens=1024))
        assert_same_run(result, alone(sae_cfg, cfg, solo), exact=True)
        assert result.sae.cfg.metadata["hook_name"] == hook
    # trainer.total_tokens=0: one pass over the cache's 4096 rows (64 batches) less the held-out ones
    one_pass = [(sae_cfg, dataclasses.replace(cfg, total_tokens=0), hook) for sae_cfg, cfg, hook in jobs[:1]]
    (result,) = train_together(one_pass, source)
    held_out = jobs[0][1].eval_batches if jobs[0][1].eval_every else 0
    assert held_out > 0 and result.steps == 4096 // BATCH - held_out


def test_jobs_on_two_hooks_of_a_live_model_equal_their_runs_alone(tmp_path):
    """A small TransformerLens model: one forward pass per model batch for both hooks, none past the deepest;
    the mixing buffer serves each hook the rows it serves that hook alone (held-out batches too)."""
    from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

    from saelab.harvest.config import ModelSourceConfig
    from saelab.harvest.pipeline import HarvestPipeline
    from saelab.harvest.tlens import TransformerLensHarvester
    from saelab.sources.harvested import ModelSource

    model = tiny_tl(n_layers=3)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    cfg = ModelSourceConfig(
        model="tiny", hook_name=hooks[0], dataset=str(write_corpus(tmp_path / "corpus")), context_size=16,
        model_batch_size=4, buffer_tokens=256,
    )  # fmt: skip

    def live(hook: str) -> ModelSource:
        pipeline = HarvestPipeline.from_tokenizer(
            TransformerLensHarvester(model, [hook]), word_tokenizer(WORDS), cfg
        )
        return ModelSource(dataclasses.replace(cfg, hook_name=hook), torch.device("cpu"), pipeline=pipeline)

    forwards = {"all": 0, "last block": 0}
    model.embed.register_forward_hook(lambda *_: forwards.__setitem__("all", forwards["all"] + 1))
    model.blocks[2].register_forward_hook(
        lambda *_: forwards.__setitem__("last block", forwards["last block"] + 1)
    )
    tc = trainer_cfg(batch_size=32, total_tokens=10 * 32, eval_every=5, checkpoint_every=0)
    jobs = [
        (TopKConfig(d_sae=64, k=4), tc, hooks[0]),
        (BatchTopKConfig(d_sae=32, k=2), tc, hooks[1]),
        (TopKConfig(d_sae=64, k=4), dataclasses.replace(tc, lr=1e-3), hooks[1]),
    ]
    source = live(hooks[0])
    forwards.update({"all": 0, "last block": 0})
    results = train_together(jobs, source)
    together = dict(forwards)
    assert (
        together["last block"] == 0 and together["all"] > 10
    )  # stops after blocks.1; both hooks in one pass
    for hook in hooks:
        forwards["all"] = 0
        runs = [
            (sae_cfg, c, result) for (sae_cfg, c, h), result in zip(jobs, results, strict=True) if h == hook
        ]
        for sae_cfg, c, result in runs:
            assert_same_run(result, alone(sae_cfg, c, live(hook)), exact=True)
            assert result.sae.cfg.metadata["training_batches"]["contexts_read"] > 0
        # alone, each job runs the model as often as the whole group did (the group and each source made alone
        # also run it once on a dummy input to learn the hooks' widths)
        assert forwards["all"] == len(runs) * (together["all"] - len(hooks) + 1)


SWEEP = [
    "sae.d_sae=64", "source.d_in=16", "source.n_features=48", "trainer.total_tokens=2048", "trainer.batch_size=128",
    "trainer.device=cpu", "trainer.checkpoint_every=8", "trainer.log_every=4", "logging.progress=false",
]  # fmt: skip


class RecordingLogger:
    """Stands in for RunLogger: records each run's logging config (its wandb group and name)."""

    configs: list = []

    def __init__(self, cfg, total_steps, run_config, output_dir):
        RecordingLogger.configs.append((cfg.group, cfg.run_name))

    def start_at(self, step):
        pass

    def advance(self, steps=1):
        pass

    def log(self, step, metrics):
        pass

    def summary(self, values):
        pass

    def close(self):
        pass


def run_files(run: Path) -> set[str]:
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_together_sweep_writes_what_the_basic_launcher_writes(tmp_path, monkeypatch, capsys):
    """Same job folders and files (.hydra/, checkpoints, sae/, summary.json), same SAEs and summaries, same
    wandb group and names, the same summary.jsonl and `saelab sweep-summary` on it."""
    monkeypatch.setattr("saelab.train.trainer.RunLogger", RecordingLogger)
    sweeps = {}
    for launcher in ("basic", "together"):
        RecordingLogger.configs = []
        sweep = tmp_path / launcher
        main(["train", "-m", f"hydra/launcher={launcher}", "sae=topk,relu", "trainer.lr=1e-3,3e-3", *SWEEP,
              f"hydra.sweep.dir={sweep}"])  # fmt: skip
        sweeps[launcher] = (sweep, sorted(RecordingLogger.configs))
    (basic, basic_logs), (together, together_logs) = sweeps["basic"], sweeps["together"]
    assert [name for _, name in basic_logs] == [name for _, name in together_logs]  # one wandb run per job
    assert {group for group, _ in together_logs} == {str(together)}  # in the sweep's group
    runs = sorted(p.name for p in basic.iterdir() if p.is_dir())
    assert len(runs) == 4 and runs == sorted(p.name for p in together.iterdir() if p.is_dir())
    for run in runs:
        assert run_files(basic / run) == run_files(together / run)
        assert "checkpoints/step_000000008/trainer_state.pt" in run_files(together / run)
        for name in ("config.yaml", "overrides.yaml"):
            assert (basic / run / ".hydra" / name).read_text() == (
                together / run / ".hydra" / name
            ).read_text()
        # the two TopK jobs (one shape) step as one stack: equal to float rounding; the ReLU jobs bit for bit
        stacked = "sae=topk" in run
        want, got = load_sae(basic / run / "sae"), load_sae(together / run / "sae")
        for key, value in want.state_dict().items():
            if stacked:
                torch.testing.assert_close(got.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
            else:
                assert torch.equal(got.state_dict()[key], value), (run, key)
        summaries = [json.loads((root / run / "summary.json").read_text()) for root in (basic, together)]
        for summary in summaries:
            summary.pop("tokens_per_s")
            config = summary.pop("config")
        assert summaries[0] == (pytest.approx(summaries[1], rel=1e-4) if stacked else summaries[1])
        assert config == json.loads((basic / run / "summary.json").read_text())["config"]
    capsys.readouterr()
    main(["sweep-summary", str(together)])
    printed = capsys.readouterr().out
    assert "4 runs (4 done)" in printed and "sae=relu trainer.lr=0.003" in printed
    rows = [json.loads(line) for line in (together / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in rows] == [(i, "done") for i in range(4)]


def no_summary_at_exit(monkeypatch) -> None:
    """A sweep that fails in this process would write its summary when pytest exits (SweepSummary's atexit)."""
    monkeypatch.setattr("saelab.app.hydra_callbacks.atexit.register", lambda *args: None)


def test_a_sweep_that_varies_the_stream_is_refused_naming_each_setting(tmp_path, capsys, monkeypatch):
    no_summary_at_exit(monkeypatch)
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit):
        main(["train", "-m", "hydra/launcher=together", "trainer.batch_size=128,256", "source.seed=0,1",
              *SWEEP[:4], f"hydra.sweep.dir={sweep}"])  # fmt: skip
    err = capsys.readouterr().err
    assert "trainer.batch_size: 128 (job 0, job 1); 256 (job 2, job 3)" in err
    assert "source.seed: 0 (job 0, job 2); 1 (job 1, job 3)" in err
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # refused before any job folder


def test_a_group_that_cannot_fit_the_device_is_refused_naming_its_jobs(monkeypatch):
    monkeypatch.setattr("saelab.train.memory.available_memory", lambda device: 2**20)
    jobs = [
        (TopKConfig(d_sae=4096, k=4), trainer_cfg(), None),
        (TopKConfig(d_sae=64, k=4), trainer_cfg(), None),
    ]
    # job 0: (2 * 16 * 4096 + 4096 + 16) float32 parameters, 4 copies: 2.06 MiB; job 1: 0.03 MiB; a step's
    # transients: 2 [64, 4096] float32 tensors, 2 MiB
    with pytest.raises(
        MemoryError, match=r"need about 4\.1 MiB .*: job 0 \(2\.1 MiB\), job 1 \(0\.0 MiB\)"
    ) as err:
        train_together(jobs, SyntheticSource(SOURCE))
    assert "plus 2.0 MiB for a training step) but 1.0 MiB is free" in str(err.value)


def test_a_job_with_a_bad_config_fails_alone(tmp_path):
    jobs = [TogetherJob(TopKConfig(d_sae=8, k=16), trainer_cfg(), output_dir=tmp_path / "bad"),
            TogetherJob(TopKConfig(d_sae=32, k=4), trainer_cfg(), output_dir=tmp_path / "good")]  # fmt: skip
    bad, good = train_together(jobs, SyntheticSource(SOURCE), progress=False)
    assert isinstance(bad, JobFailure) and "sae.k=16 must be in [1, sae.d_sae=8]" in str(bad.error)
    assert json.loads((tmp_path / "bad" / "error.json").read_text())["step"] == 0
    assert isinstance(good, TrainResult) and (tmp_path / "good" / "sae").is_dir()


def test_a_diverging_job_stops_alone_and_the_sweep_says_so(tmp_path, capsys, monkeypatch):
    """ReLU at lr 1e6 without clipping turns NaN within a few steps: that job fails (error.json, summary.jsonl
    "failed", the sweep exits with its error) while the other job trains on and equals its run alone."""
    no_summary_at_exit(monkeypatch)
    sweep = tmp_path / "sweep"
    args = ["sae=relu", "trainer.grad_clip_norm=0", *SWEEP]
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "-m",
                "hydra/launcher=together",
                "trainer.lr=1e6,3e-3",
                *args,
                f"hydra.sweep.dir={sweep}",
            ]
        )
    failed, done = sorted(p for p in sweep.iterdir() if p.is_dir())
    error = json.loads((failed / "error.json").read_text())
    assert (
        "training diverged" in error["error"] and error["type"] == "FloatingPointError" and error["step"] < 16
    )
    assert not (failed / "sae").exists() and (done / "summary.json").is_file()
    main(["train", "trainer.lr=3e-3", *args, f"hydra.run.dir={tmp_path / 'alone'}"])
    want, got = load_sae(tmp_path / "alone" / "sae"), load_sae(done / "sae")
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    capsys.readouterr()
    main(["sweep-summary", str(sweep)])
    assert "failed" in capsys.readouterr().out
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "done"] and "diverged" in rows[0]["error"]


KILLER = """
import os, signal, sys
from saelab.train.trainer import Trainer
save, saved = Trainer.save_checkpoint, []
def save_then_die(self, keep=None):
    path = save(self, keep)
    saved.append(path)
    if len(saved) == 6:  # in the second checkpoint round, after 2 of the 4 jobs wrote theirs
        os.kill(os.getpid(), signal.SIGKILL)
    return path
Trainer.save_checkpoint = save_then_die
from saelab.app.cli import main
main(sys.argv[1:])
"""


def test_a_together_sweep_killed_mid_checkpoint_resumes_to_the_uninterrupted_sweep(tmp_path):
    """kill -9 after two of four jobs wrote their step-8 checkpoint; resuming the sweep in place (trainer.
    resume_from on the sweep folder) restarts every job from step 4, the newest step all hold, and ends with
    the SAEs of a sweep never interrupted."""
    args = ["train", "-m", "hydra/launcher=together", "sae.k=2,4", "sae.d_sae=32,64", "trainer.lr=3e-3",
            "source.d_in=16", "trainer.total_tokens=1024", "trainer.batch_size=64", "trainer.device=cpu",
            "trainer.checkpoint_every=4", "trainer.keep_checkpoints=1", "logging.progress=false"]  # fmt: skip
    killed = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", KILLER, *args, f"hydra.sweep.dir={killed}"],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    runs = sorted(p for p in killed.iterdir() if p.is_dir())
    newest = [[c.name for c in (run / "checkpoints").iterdir() if c.name.startswith("step_")] for run in runs]
    assert sorted(map(sorted, newest)) == sorted(
        [["step_000000004", "step_000000008"]] * 2 + [["step_000000004"]] * 2
    )  # the round in progress keeps each job's previous checkpoint
    main([*args, f"hydra.sweep.dir={killed}", f"trainer.resume_from={killed}"])
    main([*args, f"hydra.sweep.dir={tmp_path / 'whole'}"])
    for run in runs:
        want, got = load_sae(tmp_path / "whole" / run.name / "sae"), load_sae(run / "sae")
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), (run.name, key)


def test_restarts_and_torchrun_sweeps_resume_in_place(tmp_path, monkeypatch):
    """A requeued (SLURM_RESTART_COUNT) or restarted (TORCHELASTIC_RESTART_COUNT) together sweep continues each
    job in its own folder; trainer.resume_from on a sweep folder means each job's folder there; a multirun
    under torchrun is allowed for the together launcher alone."""
    from saelab.app.together import JobSpec, finished_outcome, resume_target

    run = tmp_path / "sweep" / "0_sae.k=4"
    (run / "checkpoints" / "step_000000004").mkdir(parents=True)
    (run / "checkpoints" / "step_000000004" / "trainer_state.pt").write_bytes(b"")
    spec = JobSpec(0, run, None, TopKConfig(), None, TrainerConfig(), None, {})
    assert resume_target(spec, {}) is None
    for counter in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        assert resume_target(spec, {counter: "1"}) == str(run)
    resumed = dataclasses.replace(spec, trainer=TrainerConfig(resume_from=str(tmp_path / "sweep")))
    assert resume_target(resumed, {}) == str(run)
    (run / "sae").mkdir()
    (run / "summary.json").write_text('{"fvu": 0.5}')  # a job that finished before the requeue stays done
    assert finished_outcome(spec, None, {"SLURM_RESTART_COUNT": "2"}) == {"fvu": 0.5}
    assert finished_outcome(spec, None, {}) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_not_multirun_under_torchrun(["-m", "hydra/launcher=together", "sae.k=4,8"])
    with pytest.raises(SystemExit, match="hydra/launcher=together"):
        check_not_multirun_under_torchrun(["-m", "sae.k=4,8"])


def test_rank_assignment_balances_the_largest_jobs_first():
    assert assign_ranks([1.0, 8.0, 4.0, 4.0, 2.0], 2) == [1, 0, 1, 1, 0]
    assert assign_ranks([3.0, 3.0], 4) == [0, 1]
    assert JobFailure("job 2", ValueError("x"), 7).__str__() == "job 2 failed at step 7: ValueError: x"


TORCHRUN_SWEEP = ["sae=topk,relu", "sae.d_sae=64", "source.d_in=16", "trainer.total_tokens=1024",
                  "trainer.batch_size=64", "trainer.device=cpu", "logging.progress=false"]  # fmt: skip


def _torchrun_worker(rank: int, port: int, out: Path) -> None:
    """One of 2 torchrun-like processes (gloo): 3 SAEs data-parallel through the Python API, then a together
    sweep with its SAEs spread over the ranks through the command line (which ends the process group)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", WANDB_MODE="disabled")  # fmt: skip
    torch.set_num_threads(1)
    from saelab.parallel.distributed import setup

    setup(torch.device("cpu"))  # the process group both runs below use
    jobs = data_parallel_jobs(out / "data")
    results = train_together(jobs, SyntheticSource(SOURCE), parallel="data", progress=False)
    torch.save([r.sae.state_dict() for r in results], out / f"data{rank}.pt")
    # ${now:...} with microseconds differs per process: rank 0's sweep folder must serve both
    main(["train", "-m", "hydra/launcher=together", "hydra.launcher.parallel=distribute", *TORCHRUN_SWEEP,
          f"hydra.sweep.dir={out}/distribute/" + "${now:%H-%M-%S-%f}"])  # fmt: skip


def data_parallel_jobs(root: Path | None) -> list[TogetherJob]:
    cfg = trainer_cfg(checkpoint_every=0)
    saes = [TopKConfig(d_sae=128, k=4), ReLUConfig(d_sae=32, l1_coefficient=1.0), TopKConfig(d_sae=128, k=4)]
    cfgs = [cfg, cfg, dataclasses.replace(cfg, lr=1e-3)]
    return [
        TogetherJob(sae, c, output_dir=None if root is None else root / str(i))
        for i, (sae, c) in enumerate(zip(saes, cfgs, strict=True))
    ]


def test_under_torchrun_the_saes_spread_over_ranks_or_train_data_parallel(tmp_path):
    """2 processes (gloo, CPU). parallel=distribute: one sweep folder, every job trained by one rank on whole
    batches, bit for bit the single-process together sweep. parallel=data: every SAE data-parallel, equal to
    its run alone up to the gradient's summation order."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_torchrun_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    (sweep,) = (tmp_path / "distribute").iterdir()
    main(
        ["train", "-m", "hydra/launcher=together", *TORCHRUN_SWEEP, f"hydra.sweep.dir={tmp_path / 'single'}"]
    )
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2 and runs == sorted(p.name for p in (tmp_path / "single").iterdir() if p.is_dir())
    for run in runs:
        assert (sweep / run / ".hydra" / "config.yaml").is_file() and (sweep / run / "summary.json").is_file()
        want, got = load_sae(tmp_path / "single" / run / "sae"), load_sae(sweep / run / "sae")
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items()), run
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done", "done"]
    ranks = [torch.load(tmp_path / f"data{r}.pt") for r in range(2)]
    for job, state0, state1 in zip(data_parallel_jobs(None), *ranks, strict=True):
        want = alone(job.sae, job.trainer, SyntheticSource(SOURCE)).sae.state_dict()
        for name, value in want.items():
            assert torch.equal(state0[name], state1[name]), name  # the ranks hold one SAE
            torch.testing.assert_close(state0[name], value, rtol=1e-4, atol=2e-5, msg=name)
    assert sorted(p.name for p in (tmp_path / "data" / "0").iterdir()) == ["sae"]  # rank 0 wrote it


def test_stacks_stay_within_the_device_bound():
    assert stacked.stack_sizes(8, 1024, 2048, 64 * 2**20) == [8]  # 8 MiB of pre-activations each
    assert stacked.stack_sizes(8, 1024, 4096, 64 * 2**20) == [4, 4]
    assert stacked.stack_sizes(3, 4096, 65536, 64 * 2**20) == [1, 1, 1]  # too wide: each steps alone
    assert stacked.stack_sizes(5, 4096, 65536, None) == [5]
    assert (
        stacked.stack_limit("off", torch.device("cpu")) == 0
        and stacked.stack_limit("on", torch.device("cpu")) is None
    )


def test_a_stop_signal_checkpoints_every_job_at_that_step_and_the_sweep_resumes_to_the_uninterrupted_one(
    tmp_path, monkeypatch
):
    """SIGTERM (a preemption's warning) mid-sweep: every job checkpoints at the step boundary, TrainingStopped is
    raised, and resuming each job from its folder ends where an uninterrupted sweep ends."""
    from saelab.train.preemption import TrainingStopped

    configs = [TopKConfig(d_sae=32, k=4), ReLUConfig(d_sae=32, target_l0=None, l1_coefficient=1.0)]
    cfg = trainer_cfg(checkpoint_every=0, eval_every=0)

    def jobs(root: Path, resume: bool = False) -> list[TogetherJob]:
        return [
            TogetherJob(
                c,
                dataclasses.replace(cfg, resume_from=str(root / str(i)) if resume else None),
                output_dir=root / str(i),
            )
            for i, c in enumerate(configs)
        ]

    whole = train_together(jobs(tmp_path / "whole"), SyntheticSource(SOURCE), progress=False)
    record_step = Trainer.record_step

    def signalled(self, out, rows, logger):
        record_step(self, out, rows, logger)
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: stop at this step boundary

    monkeypatch.setattr(Trainer, "record_step", signalled)
    # the process's own SIGTERM handling, as a plain `python` run has it (an earlier CLI sweep test in this worker
    # may have left its SystemExit handler, which the stop hands the signal on to)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(TrainingStopped):
            train_together(jobs(tmp_path / "cut"), SyntheticSource(SOURCE), progress=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(Trainer, "record_step", record_step)
    for i in range(len(configs)):
        assert [p.name for p in (tmp_path / "cut" / str(i) / "checkpoints").iterdir()] == ["step_000000005"]
    resumed = [
        train_together([job], SyntheticSource(SOURCE), progress=False)[0]
        for job in jobs(tmp_path / "cut", resume=True)
    ]
    for got, want in zip(resumed, whole, strict=True):
        for name, value in want.sae.state_dict().items():
            assert torch.equal(got.sae.state_dict()[name], value), name
