"""Sparse probing (Gurnee et al. 2023; SAEBench's `sparse_probing`) on mean-pooled activations and SAE codes.

For each task and each of its classes, a balanced binary task: the class's texts against as many texts drawn
evenly from the other classes (train and test alike; the same draw for the model's activations, the SAE and
its baselines). Inputs are means over each text's tokens (BOS and other special tokens left out): of the
activations at the hook, or of the SAE's codes computed per token. Then for each k in k_values the k
dimensions with the largest |mean(positives) - mean(negatives)| on the training texts, and a logistic
regression (C = 1, as sklearn's default) on them; the score is test accuracy, averaged over a task's
classes, then over tasks. With full_probes, the same regression on every dimension (`llm_test_accuracy`,
`sae_test_accuracy`; SAEBench trains that one with Adam and keeps its best test epoch, so its figure can be a
little higher).

The model's pooled activations of each task are cached on disk (`saelab.eval.probe_data`) with the model's
probe accuracies, so another SAE at the same hook only encodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.seeds import generator
from saelab.eval.config import SparseProbingConfig
from saelab.eval.first_letter import LETTERS, FirstLetterData
from saelab.eval.logistic import accuracy, fit_logistic
from saelab.eval.probe_data import (
    ProbeModel,
    TokenRows,
    cache_folder,
    load_cached,
    run_sequences,
    segment_mean,
    store,
)
from saelab.eval.probe_tasks import TextTask, build_task
from saelab.metrics.codes import encode_codes, to_dense
from saelab.sae.base import SAE

EVAL_TYPE_ID = "sparse_probing"


@dataclass
class ProbeDataset:
    """One task's texts as token rows: train / test TokenRows and class labels [N] (index into classes)."""

    name: str
    classes: list[str]
    train: TokenRows
    test: TokenRows
    y_train: Tensor
    y_test: Tensor


def tokenize_texts(model: ProbeModel, texts: list[str], context_length: int) -> list[list[int]]:
    """[BOS] + the text's first tokens, context_length ids at most."""
    bos = [model.bos_id] if model.bos_id is not None else []
    ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [bos + list(t)[: context_length - len(bos)] for t in ids]


def _non_special(model: ProbeModel) -> Callable[[int, list[int]], list[int]]:
    special = set(model.special_token_ids) | ({model.bos_id} if model.bos_id is not None else set())
    return lambda _i, seq: [p for p, t in enumerate(seq) if t not in special]


def text_dataset(
    model: ProbeModel, task: TextTask, cfg: SparseProbingConfig, seed: int, cache_root: str | Path | None
) -> ProbeDataset:
    """Token rows of a text task's non-special positions (cached per model, hook and task)."""
    settings = {
        "train_size": cfg.train_size,
        "test_size": cfg.test_size,
        "context_length": cfg.context_length,
        "seed": seed,
        "classes": task.classes,
    }
    if task.name.startswith("shakespeare"):
        settings["corpus"] = str(Path(cfg.shakespeare_dir).expanduser().resolve())
    folder = cache_folder(cache_root, model, task.name, settings) if cache_root else None
    cached = load_cached(folder)
    if cached is None:
        parts = {}
        for split in ("train", "test"):
            texts = getattr(task, split)
            labels = [i for i, c in enumerate(task.classes) for _ in texts[c]]
            sequences = tokenize_texts(model, [t for c in task.classes for t in texts[c]], cfg.context_length)
            rows = run_sequences(model, sequences, _non_special(model))
            parts[f"{split}_rows"], parts[f"{split}_offsets"] = rows.rows, rows.offsets
            parts[f"y_{split}"] = torch.tensor(labels, dtype=torch.long)
        store(folder, parts, {"classes": task.classes})
    else:
        parts, _ = cached
    return ProbeDataset(
        task.name,
        task.classes,
        TokenRows(parts["train_rows"], parts["train_offsets"]),
        TokenRows(parts["test_rows"], parts["test_offsets"]),
        parts["y_train"],
        parts["y_test"],
    )


def first_letter_dataset(data: FirstLetterData, cfg: SparseProbingConfig) -> ProbeDataset:
    """The first-letter words (absorption's activations at each word, one row per word) of the configured
    letters that have training and test words, train_size / 2 and test_size / 2 words per letter at most."""
    wanted = [c.lower() for c in cfg.first_letter_classes]
    counts = {train: data.split(train)[1].bincount(minlength=len(LETTERS)) for train in (True, False)}
    classes = [c for c in wanted if min(int(counts[t][LETTERS.index(c)]) for t in counts) >= 1]
    if len(classes) < 2:
        raise ValueError(
            f"the first_letter probe task needs words of at least two of eval.sparse_probing.first_letter_classes="
            f"{wanted} in both the training and the test words; raise eval.absorption.max_words or pick other letters."
        )
    parts = {}
    for split, train in (("train", True), ("test", False)):
        acts, labels = data.split(train)
        cap = (cfg.train_size if train else cfg.test_size) // 2
        keep = torch.cat([torch.nonzero(labels == LETTERS.index(c)).flatten()[:cap] for c in classes])
        relabel = torch.tensor([classes.index(LETTERS[i]) for i in labels[keep].tolist()], dtype=torch.long)
        parts[split] = (TokenRows(acts[keep], torch.arange(keep.numel() + 1)), relabel)
    return ProbeDataset(
        "first_letter", classes, parts["train"][0], parts["test"][0], parts["train"][1], parts["test"][1]
    )


def load_datasets(
    model: ProbeModel,
    cfg: SparseProbingConfig,
    seed: int,
    cache_root: str | Path | None,
    first_letter: Callable[[], FirstLetterData],
) -> tuple[list[ProbeDataset], list[dict[str, str]]]:
    """(datasets, skipped): every configured task, or for a hub task that cannot be loaded its name and why."""
    datasets, skipped = [], []
    for name in cfg.tasks:
        if name == "first_letter":
            datasets.append(first_letter_dataset(first_letter(), cfg))
            continue
        try:
            task = build_task(name, cfg.shakespeare_dir, cfg.train_size, cfg.test_size, seed)
        except (ConnectionError, OSError) as error:  # the hub (or its cache) is not reachable
            if name.startswith("shakespeare"):
                raise
            skipped.append({"dataset_name": name, "reason": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        datasets.append(text_dataset(model, task, cfg, seed, cache_root))
    return datasets, skipped


@dataclass
class BinarySplit:
    """Indices into a dataset's pooled rows and labels of one class's balanced binary task."""

    train: Tensor
    y_train: Tensor
    test: Tensor
    y_test: Tensor


def _balanced(labels: Tensor, positive: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    pos = torch.nonzero(labels == positive).flatten()
    others = [torch.nonzero(labels == c).flatten() for c in labels.unique().tolist() if c != positive]
    per_class = math.ceil(pos.numel() / max(len(others), 1))
    pool = torch.cat([o[torch.randperm(o.numel(), generator=gen)[:per_class]] for o in others])
    neg = pool[torch.randperm(pool.numel(), generator=gen)[: pos.numel()]]
    index = torch.cat([pos, neg])
    y = torch.cat([torch.ones(pos.numel(), dtype=torch.bool), torch.zeros(neg.numel(), dtype=torch.bool)])
    return index, y


def binary_splits(data: ProbeDataset, seed: int) -> list[BinarySplit]:
    """One balanced binary task per class (positives vs. evenly drawn negatives), by a stream of the seed."""
    splits = []
    for c in range(len(data.classes)):
        gen = generator(seed, f"eval.sparse_probing.{data.name}", c)
        train, y_train = _balanced(data.y_train, c, gen)
        test, y_test = _balanced(data.y_test, c, gen)
        splits.append(BinarySplit(train, y_train, test, y_test))
    return splits


def probe_accuracies(
    x_train: Tensor, x_test: Tensor, splits: list[BinarySplit], k_values: list[int], full: bool, prefix: str
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """({"<prefix>_test_accuracy", "<prefix>_top_<k>_test_accuracy": mean over classes}, the per-class values)
    for pooled inputs x_train [N, F], x_test [M, F]."""
    per_class: dict[str, dict[str, float]] = {}
    keys = ([f"{prefix}_test_accuracy"] if full else []) + [
        f"{prefix}_top_{k}_test_accuracy" for k in k_values
    ]
    for key in keys:
        per_class[key] = {}
    for c, split in enumerate(splits):
        xtr, xte = x_train[split.train].double(), x_test[split.test].double()
        if full:
            probe = fit_logistic(xtr, split.y_train, C=1.0)
            per_class[f"{prefix}_test_accuracy"][str(c)] = accuracy(probe.logits(xte) > 0, split.y_test)
        diff = (xtr[split.y_train].mean(0) - xtr[~split.y_train].mean(0)).abs()
        for k in k_values:
            dims = diff.topk(min(k, diff.numel())).indices
            probe = fit_logistic(xtr[:, dims], split.y_train, C=1.0)
            per_class[f"{prefix}_top_{k}_test_accuracy"][str(c)] = accuracy(
                probe.logits(xte[:, dims]) > 0, split.y_test
            )
    means = {key: sum(v.values()) / len(v) for key, v in per_class.items()}
    return means, per_class


@torch.no_grad()
def pooled_codes(sae: SAE, rows: TokenRows, batch_size: int = 4096) -> Tensor:
    """Mean of the SAE's codes over each sequence's rows -> [N, d_sae] float32 on the CPU."""
    sums = torch.zeros(rows.n, sae.d_sae, dtype=torch.float32)
    ids = rows.segment_ids()
    for start in range(0, rows.rows.shape[0], batch_size):
        x = rows.rows[start : start + batch_size].to(sae.W_dec.device, sae.dtype)
        z = to_dense(encode_codes(sae, x), sae.d_sae).float().cpu()
        sums.index_add_(0, ids[start : start + batch_size], z)
    return sums / rows.lengths().clamp_min(1)[:, None].float()


def model_results(
    data: ProbeDataset, splits: list[BinarySplit], cfg: SparseProbingConfig
) -> tuple[dict, dict]:
    """The model's (llm_*) accuracies of one dataset: means and per class."""
    x_train, x_test = (
        segment_mean(data.train.rows, data.train.offsets),
        segment_mean(data.test.rows, data.test.offsets),
    )
    return probe_accuracies(x_train, x_test, splits, cfg.k_values, cfg.full_probes, "llm")


def sae_results(
    sae: SAE, data: ProbeDataset, splits: list[BinarySplit], cfg: SparseProbingConfig
) -> tuple[dict, dict]:
    """The SAE's (sae_*) accuracies of one dataset: means and per class."""
    x_train, x_test = pooled_codes(sae, data.train), pooled_codes(sae, data.test)
    return probe_accuracies(x_train, x_test, splits, cfg.k_values, cfg.full_probes, "sae")


def summarise(details: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    """Mean over datasets of each key."""
    return {k: sum(d[k] for d in details) / len(details) for k in keys if all(k in d for d in details)}
