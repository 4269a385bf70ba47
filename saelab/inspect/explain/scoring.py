"""Score an explanation on held-out examples, as SAEBench and EleutherAI's delphi do:

- detection: the scorer LM sees held-out activating examples mixed with as many non-activating random windows
  (unmarked) and says for each whether the feature fires in it;
- fuzzing: it sees held-out activating examples with tokens wrapped in << >>: for half of them the tokens
  where the latent fires, for the other half as many tokens where it does not, and says which marking fits.

Each score is the balanced accuracy (true-positive and true-negative rates averaged: 0.5 is chance, whatever
the mix). A prompt whose answer cannot be parsed counts every example in it as answered wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saelab.inspect.explain.clients import Client
from saelab.inspect.explain.prompts import detection_messages, fuzzing_messages, parse_labels
from saelab.inspect.site_reader import SiteExample


@dataclass
class Score:
    """balanced_accuracy (NaN when a class is empty), the examples per class and the unparsable prompts."""

    balanced_accuracy: float
    n_positive: int
    n_negative: int
    failures: int


def balanced_accuracy(truth: list[bool], predicted: list[bool]) -> float:
    """(TPR + TNR) / 2; NaN when either class is absent."""
    pos = [p for t, p in zip(truth, predicted, strict=True) if t]
    neg = [not p for t, p in zip(truth, predicted, strict=True) if not t]
    if not pos or not neg:
        return math.nan
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def ask_in_batches(
    client: Client, build, items: list, truth: list[bool], per_prompt: int
) -> tuple[list[bool], int]:
    """Ask `build(chunk)` for each chunk of `per_prompt` items; returns the predictions and the failures (a
    failed prompt predicts the opposite of the truth for all its items)."""
    predicted, failures = [], 0
    for start in range(0, len(items), per_prompt):
        chunk, answers = items[start : start + per_prompt], truth[start : start + per_prompt]
        labels = parse_labels(client.complete(build(chunk)), len(chunk))
        if labels is None:
            failures += 1
            labels = [not t for t in answers]
        predicted += labels
    return predicted, failures


def detection_score(
    client: Client,
    explanation: str,
    positives: list[SiteExample],
    negatives: list[SiteExample],
    per_prompt: int,
    gen: torch.Generator,
) -> Score:
    items = [(ex, True) for ex in positives] + [(ex, False) for ex in negatives]
    items = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
    truth = [t for _, t in items]
    examples = [ex for ex, _ in items]
    predicted, failures = ask_in_batches(
        client, lambda chunk: detection_messages(explanation, chunk), examples, truth, per_prompt
    )
    return Score(balanced_accuracy(truth, predicted), len(positives), len(negatives), failures)


def wrong_marks(acts: list[float], gen: torch.Generator) -> list[bool] | None:
    """As many tokens where the latent does not fire as where it fires, chosen at random; None when there
    are not enough of them."""
    firing = sum(a > 0 for a in acts)
    quiet = [i for i, a in enumerate(acts) if a <= 0]
    if firing == 0 or len(quiet) < firing:
        return None
    chosen = {quiet[i] for i in torch.randperm(len(quiet), generator=gen)[:firing].tolist()}
    return [i in chosen for i in range(len(acts))]


def fuzzing_score(
    client: Client, explanation: str, positives: list[SiteExample], per_prompt: int, gen: torch.Generator
) -> Score:
    order = torch.randperm(len(positives), generator=gen).tolist()
    examples, marks, truth = [], [], []
    for rank, i in enumerate(order):
        ex = positives[i]
        correct = rank % 2 == 0
        mark = [a > 0 for a in ex.acts] if correct else wrong_marks(ex.acts, gen)
        if mark is None:
            continue
        examples.append(ex)
        marks.append(mark)
        truth.append(correct)
    paired = list(zip(examples, marks, strict=True))
    predicted, failures = ask_in_batches(
        client,
        lambda chunk: fuzzing_messages(explanation, [e for e, _ in chunk], [m for _, m in chunk]),
        paired,
        truth,
        per_prompt,
    )
    return Score(balanced_accuracy(truth, predicted), sum(truth), len(truth) - sum(truth), failures)
