"""The eval suite: random baselines against a trained SAE on planted features, sparse probing against brute
force, the frontier's Pareto front, the probe-activation cache, and `saelab eval` over several SAEs with its
HTML report in headless Chromium."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from harvest_helpers import word_tokenizer
from inspect_helpers import chromium_browser

from saelab.app.cli import main
from saelab.eval.baselines import build_baselines, mean_l0
from saelab.eval.config import EvalConfig, SparseProbingConfig
from saelab.eval.evaluate import evaluate
from saelab.eval.frontier import pareto_front, write_sweep_frontier
from saelab.eval.probe_data import TokenRows
from saelab.eval.sparse_probing import ProbeDataset, binary_splits, pooled_codes, probe_accuracies
from saelab.metrics.codes import encode_codes, to_dense
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 solves: a second thread only syncs


@pytest.fixture(scope="module")
def planted():
    """A TopK SAE trained briefly on planted features (d_in 32, 128 features, 256 latents) and its source."""
    torch.set_num_threads(1)
    source = SyntheticSource(SyntheticConfig(d_in=32, n_features=128, seed=3))
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=256, k=4), torch.Generator().manual_seed(0))
    result = Trainer(sae, TrainerConfig(total_tokens=400_000, batch_size=2048, device="cpu")).fit(source)
    return source, result.sae


def planted_probe_dataset(source: SyntheticSource, classes: int, per_class: int, seed: int) -> ProbeDataset:
    """Class c: rows with planted feature c over four random background features (one row per "text"); the
    first half of each class trains, the rest tests."""
    gen = torch.Generator().manual_seed(seed)
    feats = source.features  # [n_features, d]
    rows, labels = [], []
    for c in range(classes):
        background = torch.randint(classes, feats.shape[0], (per_class, 4), generator=gen)
        x = feats[background].sum(1) * torch.rand(per_class, 1, generator=gen) + feats[c]
        rows.append(x)
        labels += [c] * per_class
    x, y = torch.cat(rows), torch.tensor(labels)
    train = (torch.arange(len(labels)) % per_class) < per_class // 2

    def part(mask):
        n = int(mask.sum())
        return TokenRows(x[mask], torch.arange(n + 1)), y[mask]

    (tr, ytr), (te, yte) = part(train), part(~train)
    return ProbeDataset("planted", [str(c) for c in range(classes)], tr, te, ytr, yte)


def test_baselines_score_near_chance_on_planted_data_while_the_trained_sae_does_not(planted):
    source, sae = planted
    report = evaluate(
        sae, source, EvalConfig(total_tokens=8192, batch_size=4096, cooccurrence_latents=0, start_batch=500)
    ).report
    assert report["recovery"]["frac_recovered"] > 0.5
    for name, figures in report["core"]["baselines"].items():  # recovery of planted features: ~nothing
        assert figures["recovery"]["frac_recovered"] < 0.05, name
        assert report["core"]["gap"][name]["recovery"]["mmcs"] > 0.3
    data = planted_probe_dataset(source, classes=4, per_class=160, seed=5)
    splits = binary_splits(data, seed=0)
    baselines = build_baselines(sae, data.train.rows, ["random_directions", "init"], seed=0)
    top1 = {}
    for name, model in {"sae": sae, **baselines}.items():
        xtr, xte = pooled_codes(model, data.train), pooled_codes(model, data.test)
        top1[name] = probe_accuracies(xtr, xte, splits, [1], False, "sae")[0]["sae_top_1_test_accuracy"]
    assert top1["sae"] > 0.9  # one learned latent per planted feature
    assert top1["random_directions"] < 0.75 and top1["init"] < 0.75  # near chance (0.5)
    assert top1["sae"] - max(top1["random_directions"], top1["init"]) > 0.2


def test_sparse_probing_matches_a_brute_force_reference():
    """Top-k by |class-mean difference| then an (almost unpenalised) logistic regression: on data where one
    dimension separates the classes exactly and the others are noise, k=1 picks it and scores 1; the
    balanced splits draw negatives evenly from the other classes."""
    g = torch.Generator().manual_seed(0)
    n, classes = 60, 3
    y = torch.arange(classes).repeat_interleave(n)
    x = torch.randn(classes * n, 8, generator=g) * 0.1
    x[torch.arange(classes * n), y] += 1.0  # dimension c marks class c
    rows = TokenRows(x, torch.arange(classes * n + 1))
    data = ProbeDataset("toy", ["a", "b", "c"], rows, rows, y, y)
    splits = binary_splits(data, seed=1)
    for c, split in enumerate(splits):
        assert split.y_train.sum() == n and (~split.y_train).sum() == n
        negatives = y[split.train[~split.y_train]]
        assert sorted(negatives.unique().tolist()) == [k for k in range(classes) if k != c]
        counts = negatives.bincount(minlength=classes)
        assert counts[c] == 0 and all(abs(counts[k] - n / 2) <= 1 for k in range(classes) if k != c)
        diff = (x[split.train][split.y_train].mean(0) - x[split.train][~split.y_train].mean(0)).abs()
        assert diff.argmax() == c
    means, per_class = probe_accuracies(x, x, splits, [1, 2], True, "llm")
    assert means == {"llm_test_accuracy": 1.0, "llm_top_1_test_accuracy": 1.0, "llm_top_2_test_accuracy": 1.0}
    assert set(per_class["llm_top_1_test_accuracy"]) == {"0", "1", "2"}


def test_baselines_are_built_from_the_sae():
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=5), g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) + 0.5)  # rows of unequal norms
    x = torch.randn(512, 16, generator=g) * 3 + 1
    base = build_baselines(sae, x, ["random_decoder", "random_directions", "init"], seed=0)
    z = to_dense(encode_codes(sae, x), 64)
    assert torch.equal(to_dense(encode_codes(base["random_decoder"], x), 64), z)  # same encoder
    assert torch.allclose(base["random_decoder"].W_dec.norm(dim=1), sae.W_dec.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(base["random_decoder"].W_dec, sae.W_dec, dim=1)
    assert cos.abs().max() < 0.9
    assert mean_l0(base["random_directions"], x) == pytest.approx(5.0)
    assert torch.allclose(base["random_directions"].W_enc.T / base["random_directions"].W_enc.norm(dim=0)[:, None],
                          base["random_directions"].W_dec)  # fmt: skip
    init = base["init"]
    assert type(init) is TopKSAE and init.cfg.k == 5
    assert torch.allclose(
        init.W_dec.norm(dim=1) * (16**0.5 / x.norm(dim=1).mean()), torch.ones(64), atol=1e-4
    )
    again = build_baselines(sae, x, ["init", "random_directions"], seed=0)
    assert torch.equal(again["init"].W_dec, init.W_dec)  # one stream per baseline and seed
    assert not torch.equal(build_baselines(sae, x, ["init"], seed=1)["init"].W_dec, init.W_dec)


def test_pareto_front_matches_brute_force_and_the_sweep_writes_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    points = [{"name": str(i), "l0": float(a), "fvu": float(b), "kind": "run"} for i, (a, b) in
              enumerate(torch.rand(40, 2, generator=g).tolist())]  # fmt: skip
    points.append({"name": "baseline", "l0": 0.0, "fvu": 0.0, "kind": "baseline"})  # never on the front
    front = pareto_front(points, "fvu", higher_is_better=False)
    brute = {
        i for i, p in enumerate(points[:-1])
        if not any(q["l0"] <= p["l0"] and q["fvu"] <= p["fvu"] and (q["l0"], q["fvu"]) != (p["l0"], p["fvu"])
                   for q in points[:-1])
    }  # fmt: skip
    assert front == brute and len(front) >= 2
    rows = [
        {"job": i, "run": f"{i}_k={k}", "status": "done", "overrides": [f"sae.k={k}"], "l0": k, "fvu": f}
        for i, (k, f) in enumerate([(8, 0.3), (16, 0.2), (32, 0.25), (64, 0.1)])
    ] + [{"job": 4, "run": None, "status": "missing", "overrides": ["sae.k=128"]}]
    files = write_sweep_frontier(tmp_path, rows)
    assert [f.name for f in files] == ["frontier_fvu.png", "frontier.html"]
    page = (tmp_path / "frontier.html").read_text()
    marked = dict(re.findall(r"data-point='(\d)' data-kind='run' data-front='(\d)'", page))
    assert marked == {"0": "1", "1": "1", "2": "0", "3": "1"}  # k=32 is dominated by k=16
    assert "sae.k=32" in page and "sae.k=128" not in page


LETTER_WORDS = [
    f"{c}{s}" for c in "abcdefghijklmnopqrstuvwxyz" for s in ("ab", "ox", "ump", "ilt", "erd", "yn")
]
TEMPLATE_WORDS = ["has", "the", "first", "letter", ":", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def save_letter_llama(folder: Path) -> None:
    """A small random Llama whose word-level vocabulary holds letter words and the prompt's words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    words = LETTER_WORDS + TEMPLATE_WORDS
    cfg = LlamaConfig(
        vocab_size=3 + len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    word_tokenizer(words).save_pretrained(folder)


def write_plays(folder: Path) -> Path:
    """Five `<play>_gut.txt` files of speeches ("SPEAKER." then words) in the Gutenberg layout."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for p, play in enumerate(["hamlet", "macbeth", "othello", "lear", "romeo_and_juliet"]):
        speeches = []
        for s in range(12):
            idx = torch.randint(0, 26, (6,), generator=g).tolist()
            words = " ".join(LETTER_WORDS[6 * i + p] for i in idx)
            speeches.append(f"{'AB'[s % 2]}{play[:3].upper()}.\n{words}\n{words.upper()}")
        (folder / f"{play}_gut.txt").write_text("\n\n".join(speeches))
    return folder


class Cells(HTMLParser):
    """Table cells by table id and row metric: {(table, metric): [texts]}, and body data-* attributes."""

    def __init__(self):
        super().__init__()
        self.cells, self.table, self.metric, self.cell, self.body = {}, None, None, None, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table":
            self.table = a.get("id")
        if tag == "tr":
            self.metric = a.get("data-metric")
        if tag == "td" and self.metric:
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.cells.setdefault((self.table, self.metric), []).append(self.cell)
            self.cell = None


def test_saelab_eval_suite_over_two_saes_with_report_html_and_probe_cache(tmp_path, monkeypatch):
    folder, plays, corpus = tmp_path / "llama", write_plays(tmp_path / "plays"), tmp_path / "corpus"
    save_letter_llama(folder)
    corpus.mkdir()
    (corpus / "doc.txt").write_text(" ".join(LETTER_WORDS * 6))
    for i in range(2):
        sae = TopKSAE(TopKConfig(d_in=32, d_sae=48, k=2 + 2 * i, metadata={"hook_name": "model.layers.1"}),
                      torch.Generator().manual_seed(i))  # fmt: skip
        sae.save(tmp_path / f"sae{i}")
    args = [
        f"sae=[{tmp_path / 'sae0'},{tmp_path / 'sae1'}]", "source=model", f"source.model={folder}",
        "source.backend=hf", "source.hook_name=model.layers.1", f"source.dataset={corpus}",
        "source.context_size=16", "eval.total_tokens=64", "eval.lm_batch_size=2", "eval.cooccurrence_latents=0",
        "eval.device=cpu", "eval.suite=[core,absorption,sparse_probing]", f"eval.probe_cache={tmp_path / 'cache'}",
        "eval.absorption.max_icl_examples=2", "eval.absorption.min_letters=1", "eval.absorption.min_probe_f1=-1",
        "eval.absorption.max_k_value=2", "eval.sparse_probing.tasks=[first_letter,shakespeare_play]",
        "eval.sparse_probing.k_values=[1,2]", "eval.sparse_probing.train_size=12", "eval.sparse_probing.test_size=6",
        "eval.sparse_probing.context_length=12", "eval.sparse_probing.first_letter_classes=[a,b]",
        f"eval.sparse_probing.shakespeare_dir={plays}", "logging.progress=false",
    ]  # fmt: skip
    out = tmp_path / "out"
    main(["eval", *args, f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h1'}"])
    reports = {n: json.loads((out / n / "report.json").read_text()) for n in ("sae0", "sae1")}
    report = reports["sae0"]
    absorption, probing = report["absorption_first_letter"], report["sparse_probing"]
    assert absorption["eval_type_id"] == "absorption_first_letter" and absorption["words"]["train"] > 120
    assert set(absorption["eval_result_metrics"]["mean"]) >= {
        "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features"}  # fmt: skip
    assert set(absorption["baselines"]) == {"random_decoder", "random_directions", "init"}
    assert set(probing["eval_result_metrics"]["sae"]) == {
        "sae_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
    }
    assert [d["dataset_name"] for d in probing["eval_result_details"]] == ["first_letter", "shakespeare_play"]
    assert probing["baselines"]["random_decoder"]["same_codes_as_sae"]
    for name, base in probing["baselines"].items():
        for key, value in probing["eval_result_metrics"]["sae"].items():
            assert probing["gap"][name][key] == pytest.approx(value - base["eval_result_metrics"]["sae"][key])
    assert (
        report["core"]["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"]
        == report["lm"]["ce_loss_score"]
    )
    assert reports["sae1"]["data"] == report["data"]  # the same held-out batches for both SAEs
    assert report["reconstruction"]["l0"] <= 2 < reports["sae1"]["reconstruction"]["l0"]
    assert (out / "frontier_fvu.png").is_file() and (out / "frontier_ce_loss_score.png").is_file()
    assert "sae0" in (out / "frontier.html").read_text()
    for plot in ("density", "frontier_position", "absorption_letters", "probing_k"):
        assert (out / "sae0" / f"{plot}.png").is_file()

    cached = sorted(
        p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").rglob("meta.json") for p in [p.parent]
    )
    assert cached == ["first_letter", "shakespeare_play"]
    calls = []  # a second run reads the probe activations from the disk cache: the model runs for core only
    import saelab.eval.probe_data as probe_data

    monkeypatch.setattr(probe_data, "run_sequences", lambda *a, **k: calls.append(1))
    main(["eval", *args[:-1], "eval.suite=[absorption,sparse_probing]", f"sae={tmp_path / 'sae0'}",
          f"output_dir={tmp_path / 'again'}", f"hydra.run.dir={tmp_path / 'h2'}", "eval.plots=false"])  # fmt: skip
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert not calls and "core" not in again
    assert again["sparse_probing"]["eval_result_metrics"] == probing["eval_result_metrics"]
    assert again["absorption_first_letter"]["eval_result_metrics"] == absorption["eval_result_metrics"]

    with chromium_browser() as browser:
        tab = browser.new_page()
        tab.goto((out / "sae0" / "report.html").as_uri(), wait_until="load")
        tab.wait_for_function("document.body.dataset.imagesLoaded !== undefined", timeout=30_000)
        dom = tab.content()
    page = Cells()
    page.feed(dom)
    assert int(page.body["data-images-loaded"]) == 6  # every plot decoded
    label, sae_fvu, *rest = page.cells[("core", "fvu")]  # metric, SAE, then per baseline its value and gap
    assert label == "fvu" and float(sae_fvu) == pytest.approx(report["reconstruction"]["fvu"], rel=1e-3)
    init_fvu = report["core"]["baselines"]["init"]["reconstruction"]["fvu"]
    assert float(rest[4]) == pytest.approx(init_fvu, rel=1e-3)
    assert float(rest[5]) == pytest.approx(report["reconstruction"]["fvu"] - init_fvu, rel=1e-3, abs=1e-4)
    top1 = page.cells[("probing", "sae_top_1_test_accuracy")]
    want = probing["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"]
    assert float(top1[1]) == pytest.approx(want, rel=1e-3)
    assert ("absorption", "mean_full_absorption_score") in page.cells


def test_offline_tasks_parse_speeches_and_hub_tasks_are_skipped_when_unreachable(tmp_path, monkeypatch):
    from saelab.eval import probe_tasks
    from saelab.eval.probe_data import ProbeModel
    from saelab.eval.sparse_probing import load_datasets

    play = tmp_path / "hamlet_gut.txt"
    play.write_text(
        "HAMLET, PRINCE OF DENMARK\n\nACT I.\n\nHam.\nTo be, or not to be,--that is the question:--\n"
        "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune\nOr to take arms\n\n"
        "[Enter Ghost.]\n\nFirst Clown.\nWhy, there thou say'st: and the more pity that great\nfolk should have "
        "countenance in this world to drown or\nhang themselves more than their even Christian.\n"
    )
    speeches = probe_tasks.read_speeches(play)
    assert [(s.speaker, len(s.lines)) for s in speeches] == [("Ham", 4), ("First Clown", 3)]
    assert probe_tasks.verse_or_prose(speeches[0]) == "verse"
    assert (
        probe_tasks.verse_or_prose(probe_tasks.Speech("x", "y", [*speeches[1].lines, "and so on"])) == "prose"
    )

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr("datasets.load_dataset", offline)
    model = ProbeModel("m", "h", None, lambda t: t, None, [])
    cfg = SparseProbingConfig(tasks=["fancyzhx/ag_news"])
    datasets, skipped = load_datasets(model, cfg, 0, None, lambda: None)
    assert datasets == [] and skipped[0]["dataset_name"] == "fancyzhx/ag_news"
    assert "hub unreachable" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="choose among first_letter"):
        load_datasets(model, SparseProbingConfig(tasks=["no_such_task"]), 0, None, lambda: None)
