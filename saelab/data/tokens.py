"""Text to token contexts: a `datasets` split (hub name or local text/json/jsonl/parquet/csv files) ->
tokenizer -> packed fixed-length contexts.

Packing: documents are tokenized without special tokens and concatenated with a separator (the BOS token)
between them; each context is [BOS] + the next context_size - 1 tokens of that stream (or context_size
tokens without BOS when prepend_bos is false). A document longer than one context continues in the next.
BOS, separator, pad and every other special token are dropped from training activations by `keep_mask`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: Local file suffix -> `datasets` packaged builder.
LOCAL_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass
class TextSpec:
    """Where the text comes from.

    dataset: a hub name (e.g. "NeelNanda/pile-10k"), or a local file, folder or glob of text/json/jsonl/
    parquet/csv files. dataset_name: the hub config name. sample_by: for local .txt files, one example per
    "document" (whole file), "paragraph" or "line".
    """

    dataset: str
    dataset_name: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    sample_by: str = "document"


def local_data_files(path: str) -> list[str] | None:
    """The files a local dataset path names (file, folder or glob); None if `path` is not local."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_BUILDERS)
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True))
    else:
        return None
    if not files:
        raise FileNotFoundError(
            f"source.dataset={path!r} matched no files with a suffix in {sorted(LOCAL_BUILDERS)}; "
            "check the path (relative paths are taken from the current directory)."
        )
    builders = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(
            f"source.dataset={path!r} mixes or includes unsupported file types {sorted({f.suffix for f in files})}; "
            f"use files of one kind among {sorted(LOCAL_BUILDERS)}."
        )
    return [str(f) for f in files]


def load_text_dataset(spec: TextSpec) -> Iterable[dict[str, Any]]:
    """Open the dataset split as an iterable of rows (streaming or not) with `datasets.load_dataset`."""
    import datasets

    files = local_data_files(spec.dataset)
    if files is None:
        return datasets.load_dataset(
            spec.dataset, spec.dataset_name, split=spec.split, streaming=spec.streaming
        )
    builder = LOCAL_BUILDERS[Path(files[0]).suffix]
    extra = {"sample_by": spec.sample_by} if builder == "text" else {}
    return datasets.load_dataset(
        builder, data_files=files, split=spec.split, streaming=spec.streaming, **extra
    )


def iter_texts(rows: Iterable[dict[str, Any]], column: str) -> Iterator[str]:
    """The non-empty strings of `column`; a missing column is an error listing the available ones, a value that
    is not a string (a number, a list) an error naming the column."""
    for row in rows:
        if column not in row:
            raise KeyError(
                f"source.text_column={column!r} is not a column of the dataset; it has {sorted(row)}."
            )
        text = row[column]
        if text and not isinstance(text, str):
            raise TypeError(
                f"source.text_column={column!r} holds a {type(text).__name__} ({str(text)[:60]!r}), not text; "
                "point source.text_column at a column of strings."
            )
        if text:
            yield text


def tokenize_documents(
    texts: Iterable[str], tokenizer: Any, chunk_chars: int = 100_000
) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens added); texts are tokenized in groups of ~chunk_chars."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch, size = [], 0
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack_contexts(docs: Iterable[list[int]], context_size: int, bos_id: int | None) -> Iterator[list[int]]:
    """Pack token documents into contexts of exactly `context_size` ids (see module docstring).

    bos_id None: plain chunks of the concatenated documents, no separator. The incomplete tail is dropped.
    """
    body = context_size - (bos_id is not None)
    if body < 1:
        raise ValueError(
            f"source.context_size={context_size} is too small; it must be at least 2 with a BOS token."
        )
    stream: list[int] = []
    start = 0
    for doc in docs:
        if not doc:
            continue
        if bos_id is not None and len(stream) > start:
            stream.append(bos_id)  # document boundary
        stream.extend(doc)
        while True:
            if bos_id is not None and start < len(stream) and stream[start] == bos_id:
                start += 1  # a boundary right after the context's own BOS adds nothing
            if len(stream) - start < body:
                break
            chunk = stream[start : start + body]
            start += body
            yield [bos_id, *chunk] if bos_id is not None else chunk
        stream, start = stream[start:], 0


def excluded_token_ids(tokenizer: Any) -> list[int]:
    """Ids never used as training activations: every special token (BOS, EOS, pad, ...) of the tokenizer."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def keep_mask(tokens: Tensor, excluded: Tensor) -> Tensor:
    """tokens [B, T] int, excluded [E] int -> bool [B, T], True where the token is not excluded."""
    return ~torch.isin(tokens, excluded.to(tokens.device))


def bos_token_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id, else its EOS id (the conventional context start for BOS-less models)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token; set source.prepend_bos=false.")


class ContextStream:
    """Packed contexts of one dataset split, batched; deterministic, so a resumed harvest can skip ahead."""

    def __init__(self, spec: TextSpec, tokenizer: Any, context_size: int, prepend_bos: bool = True):
        self.spec = spec
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.bos_id = bos_token_id(tokenizer) if prepend_bos else None

    def contexts(self) -> Iterator[list[int]]:
        """One pass over the dataset: lists of context_size token ids."""
        texts = iter_texts(load_text_dataset(self.spec), self.spec.text_column)
        return pack_contexts(tokenize_documents(texts, self.tokenizer), self.context_size, self.bos_id)

    def contexts_holding(self, rows: int, excluded: Tensor, reserved: int = 0) -> int:
        """How many contexts from the start (the dataset repeating) it takes to hold `rows` kept tokens
        (tokens not in `excluded`), counted as `batches(..., reserved=reserved)` counts them: the first
        `reserved` contexts of every pass after the first are not read. Tokenizes at most two passes."""
        if rows <= 0:
            return 0
        drop = set(excluded.tolist())
        seen = kept = kept_reserved = 0
        for ctx in self.contexts():
            seen += 1
            kept += sum(t not in drop for t in ctx)
            if seen == reserved:
                kept_reserved = kept
            if kept >= rows:
                return seen
        per_pass, contexts_per_pass = kept - kept_reserved, seen - reserved
        if reserved >= seen or per_pass == 0:
            raise self._nothing_after(reserved, seen)
        epochs, rest = divmod(rows - kept, per_pass)  # later passes hold `per_pass` rows each
        if rest == 0:
            return seen + epochs * contexts_per_pass
        within = self.contexts_holding(rest + kept_reserved, excluded) - reserved
        return seen + epochs * contexts_per_pass + within

    def _nothing_after(self, reserved: int, contexts: int) -> ValueError:
        """The error for a text with no kept token to repeat past its first `reserved` of `contexts` contexts."""
        if reserved == 0:
            return ValueError(
                f"source.dataset={self.spec.dataset!r} yields no non-special tokens; use more text."
            )
        return ValueError(
            f"source.dataset={self.spec.dataset!r} holds {contexts} contexts and no non-special token past the "
            f"first {reserved}, held out for evaluation: nothing is left to repeat for training. Use more text, a "
            "smaller source.buffer_tokens or trainer.eval_batches, or set trainer.eval_every=0."
        )

    def batches(
        self, batch_size: int, skip: int = 0, repeat: bool = False, reserved: int = 0
    ) -> Iterator[Tensor]:
        """Token batches [batch_size, context_size] (int64), after skipping `skip` contexts.

        repeat: start over at the end of the dataset (for training runs longer than the corpus); otherwise
        a final partial batch is yielded. reserved: contexts at the start of the text (held out for
        evaluation) that the passes after the first skip; they do not count towards `skip`. Raises if the
        dataset holds no complete context, or none past the reserved ones to repeat.
        """
        seen = passes = 0
        batch: list[list[int]] = []
        while True:
            produced = length = 0
            for position, ctx in enumerate(self.contexts()):
                length = position + 1
                if passes and position < reserved:
                    continue
                produced += 1
                seen += 1
                if seen <= skip:
                    continue
                batch.append(ctx)
                if len(batch) == batch_size:
                    yield torch.tensor(batch, dtype=torch.long)
                    batch = []
            if produced == 0 and passes == 0:
                raise ValueError(
                    f"source.dataset={self.spec.dataset!r} yields no complete context of {self.context_size} "
                    "tokens; use more text or a smaller source.context_size."
                )
            if produced == 0:
                raise self._nothing_after(reserved, length)
            if not repeat:
                break
            passes += 1
        if batch:
            yield torch.tensor(batch, dtype=torch.long)
