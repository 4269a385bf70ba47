"""The first-letter task's data: vocabulary words in spelling prompts, and the activations at each word.

Words are the vocabulary tokens whose text is ASCII letters (one leading space allowed), as SAEBench's
`get_alpha_tokens`. Each prompt is built from token ids, so the word stays exactly its vocabulary token:

    [BOS] \\n <ex_1> <after> <answer_1> \\n ... \\n <ex_m> <after> <answer_m> \\n <word> <after>

with `<after>` the template's text after `{word}` (" has the first letter:") and `<answer>` e.g. " C"; the m
in-context examples are drawn from the same split's other words. The activation is read at the word's
position (SAEBench's prompt_token_pos = -6 for its default template). Words are shuffled and split into
train / test by a stream derived from the eval seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.seeds import generator
from saelab.eval.config import AbsorptionConfig
from saelab.eval.probe_data import ProbeModel, cache_folder, load_cached, run_sequences, store

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class FirstLetterData:
    """acts [N, d] float32 at each word, labels [N] long (letter index), train [N] bool, words [N] (their text)."""

    acts: Tensor
    labels: Tensor
    train: Tensor
    words: list[str]

    def split(self, train: bool) -> tuple[Tensor, Tensor]:
        mask = self.train if train else ~self.train
        return self.acts[mask], self.labels[mask]

    def words_of(self, train: bool) -> list[str]:
        mask = (self.train if train else ~self.train).tolist()
        return [w for w, m in zip(self.words, mask, strict=True) if m]


def letter_of(word: str) -> int | None:
    """Index of the first ASCII letter of `word` (lower-cased) in LETTERS, None when it has none."""
    for ch in word:
        if ch.isascii() and ch.isalpha():
            return LETTERS.index(ch.lower())
    return None


def alpha_tokens(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of every vocabulary token whose text, less one leading space, is ASCII letters;
    sorted by id."""
    found = []
    for token, token_id in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        word = text[1:] if text.startswith(" ") else text
        if word and all(ch.isascii() and ch.isalpha() for ch in word):
            found.append((int(token_id), text))
    return sorted(found)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_prompts(
    tokenizer, words: list[tuple[int, str]], cfg: AbsorptionConfig, bos_id: int | None, gen: torch.Generator
) -> tuple[list[list[int]], list[int]]:
    """(token ids of each word's prompt, position of the word in it); examples come from `words` too."""
    before, after = cfg.prompt_template.split("{word}", 1)
    sep, pre, post = _ids(tokenizer, "\n"), _ids(tokenizer, before), _ids(tokenizer, after)
    answers = [
        _ids(tokenizer, cfg.answer_template.replace("{LETTER}", c.upper()).replace("{letter}", c))
        for c in LETTERS
    ]
    prompts, positions = [], []
    n_examples = min(cfg.max_icl_examples, len(words) - 1)
    for i, (word_id, _) in enumerate(words):
        others = torch.randperm(len(words) - 1, generator=gen)[:n_examples]
        ids = ([bos_id] if bos_id is not None else []) + sep
        for j in others.tolist():
            ex_id, ex_text = words[j if j < i else j + 1]
            ids += pre + [ex_id] + post + answers[letter_of(ex_text)] + sep
        ids += pre
        positions.append(len(ids))
        prompts.append(ids + [word_id] + post)
    return prompts, positions


def settings(cfg: AbsorptionConfig, seed: int) -> dict:
    """What decides the first-letter data (its cache key)."""
    names = ("prompt_template", "answer_template", "max_icl_examples", "max_words", "train_fraction")
    return {**{n: getattr(cfg, n) for n in names}, "seed": seed}


def first_letter_data(
    model: ProbeModel, cfg: AbsorptionConfig, seed: int, cache_root: str | Path | None = None
) -> FirstLetterData:
    """The first-letter data of `model` at its hook (read from the cache when there, else computed and stored)."""
    folder = cache_folder(cache_root, model, "first_letter", settings(cfg, seed)) if cache_root else None
    cached = load_cached(folder)
    if cached is not None:
        tensors, meta = cached
        return FirstLetterData(tensors["acts"], tensors["labels"], tensors["train"].bool(), meta["words"])
    vocab = alpha_tokens(model.tokenizer)
    order = torch.randperm(len(vocab), generator=generator(seed, "eval.first_letter.words"))
    if cfg.max_words:
        order = order[: cfg.max_words]
    words = [vocab[i] for i in order.tolist()]
    n_train = int(len(words) * cfg.train_fraction)
    if n_train < 2 or len(words) - n_train < 2:
        raise ValueError(
            f"the first-letter task found {len(words)} words; it needs at least 4 (eval.absorption.max_words)."
        )
    prompts, positions = [], []
    for index, part in enumerate((words[:n_train], words[n_train:])):
        p, pos = build_prompts(
            model.tokenizer, part, cfg, model.bos_id, generator(seed, "eval.first_letter.examples", index)
        )
        prompts += p
        positions += pos
    rows = run_sequences(model, prompts, lambda i, _: [positions[i]])
    labels = torch.tensor([letter_of(text) for _, text in words], dtype=torch.long)
    train = torch.zeros(len(words), dtype=torch.bool)
    train[:n_train] = True
    data = FirstLetterData(rows.rows, labels, train, [text for _, text in words])
    store(
        folder, {"acts": data.acts, "labels": labels, "train": train.to(torch.uint8)}, {"words": data.words}
    )
    return data
