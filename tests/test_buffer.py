"""Mixing buffer: every row served exactly once, about half served per refill, rows of many sources mixed."""

import itertools

import pytest
import torch

from saelab.buffer.mixing import MixingBuffer, buffer_device


def id_rows(start: int, n: int, d: int = 3) -> torch.Tensor:
    """Rows whose every entry is the row's global index, so a served row says where it came from."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def random_chunks(sizes: list[int]) -> list[torch.Tensor]:
    chunks, start = [], 0
    for n in sizes:
        chunks.append(id_rows(start, n))
        start += n
    return chunks


def test_every_row_is_served_exactly_once():
    sizes = torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    total = sum(sizes)
    batches = list(MixingBuffer(capacity=512, d=3, batch_size=64).batches(random_chunks(sizes)))
    assert all(b.shape == (64, 3) for b in batches[:-1]) and 0 < batches[-1].shape[0] <= 64
    served = torch.cat(batches)
    assert torch.equal(served[:, 0], served[:, 2])  # rows are intact
    assert torch.equal(served[:, 0].sort().values, torch.arange(total, dtype=torch.float32))


def test_serves_half_then_refills():
    cap, batch, chunk = 1024, 64, 100
    pulls: list[int] = []  # rows served when each chunk was requested
    served = [0]

    def chunks():
        for i in range(30):
            pulls.append(served[0])
            yield id_rows(i * chunk, chunk)

    for b in MixingBuffer(cap, 3, batch).batches(chunks()):
        served[0] += b.shape[0]
    first_fill = -(-cap // chunk)  # 11 chunks fill 1024 rows (the 11th only partly)
    assert pulls[:first_fill] == [0] * first_fill
    # the next chunk is requested once the buffer is down to (just under) half, never before
    assert cap // 2 <= pulls[first_fill] < cap // 2 + batch
    assert served[0] == 30 * chunk


def test_rows_of_many_sources_are_mixed():
    """8 sources (e.g. contexts) of 128 rows arrive one after another; each served batch mixes them all."""
    n_src, per_src, batch = 8, 128, 64
    chunks = [id_rows(s * per_src, per_src) for s in range(n_src)]
    batches = list(MixingBuffer(capacity=n_src * per_src, d=3, batch_size=batch, seed=1).batches(chunks))
    first_half = torch.cat(batches[: len(batches) // 2])[:, 0].long() // per_src
    counts = torch.bincount(first_half, minlength=n_src).double()
    # without mixing the first half would hold 4 sources only; shuffled, each holds ~1/8 (sd ~ 6 rows)
    assert counts.min() >= 0.5 * counts.mean() and counts.max() <= 1.5 * counts.mean()
    for b in batches[:4]:
        assert len(set((b[:, 0].long() // per_src).tolist())) >= 6


def test_buffer_too_small_for_the_batch_is_an_error():
    with pytest.raises(ValueError, match="source.buffer_tokens"):
        MixingBuffer(capacity=100, d=3, batch_size=64)


def test_buffer_device_choice():
    assert buffer_device("auto", torch.device("cpu"), 1 << 40) == torch.device("cpu")
    assert buffer_device("cpu", torch.device("cpu"), 10) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_buffer_lives_on_the_gpu_when_it_fits():
    dev = torch.device("cuda")
    assert buffer_device("auto", dev, 1 << 20) == dev
    assert buffer_device("auto", dev, 1 << 50) == torch.device("cpu")
    batches = list(MixingBuffer(256, 3, 32, device=dev).batches([id_rows(0, 1000)]))
    assert batches[0].device.type == "cuda"
    assert torch.equal(torch.cat(batches)[:, 0].sort().values.cpu(), torch.arange(1000, dtype=torch.float32))


def test_live_model_source_serves_harvested_rows_and_trains(tmp_path):
    """The "model" source: tokens -> small TransformerLens model -> buffer -> trainer, end to end."""
    from harvest_helpers import WORDS, tiny_tl, word_tokenizer, write_corpus

    from saelab.harvest.config import ModelSourceConfig
    from saelab.harvest.pipeline import HarvestPipeline, harvest_rows
    from saelab.harvest.tlens import TransformerLensHarvester
    from saelab.sae.topk import TopKConfig, TopKSAE
    from saelab.sources.harvested import ModelSource
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    hook = "blocks.1.hook_resid_post"
    cfg = ModelSourceConfig(
        model="tiny", hook_name=hook, dataset=str(write_corpus(tmp_path / "corpus")), context_size=16,
        model_batch_size=4, buffer_tokens=256,
    )  # fmt: skip
    pipeline = HarvestPipeline.from_tokenizer(
        TransformerLensHarvester(tiny_tl(), [hook]), word_tokenizer(WORDS), cfg
    )
    source = ModelSource(cfg, torch.device("cpu"), pipeline=pipeline)
    assert source.d_in == 32 and source.metadata()["hook_name"] == hook
    harvested = torch.cat([acts[hook] for acts, _, _ in itertools.islice(harvest_rows(pipeline, 4), 8)])
    served = torch.cat(list(itertools.islice(source.batches(32), 4)))  # the first half of the first fill
    first_fill = harvested[:256]
    match = (served[:, None, :] == first_fill[None]).all(-1)  # [128 served, 256 harvested]
    # every served row was harvested, no more often than harvested (identical rows occur: the same token
    # right after BOS has the same activation in every context)
    served_copies = (served[:, None, :] == served[None]).all(-1).sum(1)
    assert (match.sum(1) >= 1).all() and (served_copies <= match.sum(1)).all()
    assert match.float().argmax(1).float().std() > 50  # drawn from all over the buffer, not in harvest order
    # held-out batches (0, 1) and a stream started at batch 2 share no rows (rows that occur more than once
    # in the corpus's activations, e.g. a word right after BOS, may legitimately appear in both)
    everything = torch.cat([acts[hook] for acts, _, _ in harvest_rows(pipeline, 4)])
    copies = (everything[:, None, :] == everything[None]).all(-1).sum(1)
    unique_rows = everything[copies == 1]
    held = torch.cat(list(itertools.islice(source.batches(32), 2)))
    later = torch.cat(list(itertools.islice(source.batches(32, start_batch=2), 8)))
    held_u = held[(held[:, None, :] == unique_rows[None]).all(-1).any(1)]
    assert len(held_u) > 40 and not (later[:, None, :] == held_u[None]).all(-1).any()
    result = Trainer(
        TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4)),
        TrainerConfig(total_tokens=640, batch_size=32, device="cpu"),
    ).fit(source)
    assert result.steps == 20 and torch.isfinite(result.sae.W_dec).all()
