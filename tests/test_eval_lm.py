"""CE with the SAE spliced into a language model, vs references computed with hand-written hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saelab.eval.lm import LMEvaluator
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.splice.hooks import feature_activations, spliced

BOS, PAD = 0, 1


def identity_sae(d: int) -> ReLUSAE:
    """ReLU SAE with z = [relu(x), relu(-x)] and x_hat = relu(x) - relu(-x) = x exactly."""
    sae = ReLUSAE(ReLUConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


class Block(nn.Module):
    """Returns a tuple, like older Hugging Face decoder layers."""

    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return (x + self.mlp(x), None)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 37, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.unembed = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)[0]
        return self.unembed(x)


def token_batch(gen: torch.Generator, vocab: int = 37) -> torch.Tensor:
    tokens = torch.randint(2, vocab, (3, 12), generator=gen)
    tokens[:, 0] = BOS
    tokens[1, 9:] = PAD
    return tokens


def reference_ce(model, tokens, replace=None, hook_module=None):
    """Mean CE over counted predictions, with an optional hand-written replacement at non-special positions."""
    special = (tokens == BOS) | (tokens == PAD)
    handle = None
    if replace is not None:

        def hook(module, args, output):
            h = output[0]
            return (torch.where(special[..., None], h, replace(h)), *output[1:])

        handle = hook_module.register_forward_hook(hook)
    try:
        logits = model(tokens).double()
    finally:
        if handle is not None:
            handle.remove()
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    )
    counted = (~special[:, :-1] & ~special[:, 1:]).reshape(-1)
    return ce[counted].mean().item(), logits, counted


def test_identity_sae_gives_clean_ce_and_zero_kl_on_an_nn_module():
    torch.manual_seed(0)
    model = TinyLM().eval()
    gen = torch.Generator().manual_seed(0)
    lm = LMEvaluator(model, identity_sae(16), "layers.0", special_token_ids=[BOS, PAD])
    batches = [token_batch(gen) for _ in range(2)]
    for tokens in batches:
        lm.update(tokens)
    out = lm.compute()
    clean = [reference_ce(model, t) for t in batches]
    want_clean = sum(c * m.sum().item() for c, _, m in clean) / sum(m.sum().item() for _, _, m in clean)
    assert out["predictions"] == sum(m.sum().item() for _, _, m in clean)
    assert out["ce_clean"] == pytest.approx(want_clean, abs=1e-5)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)


def test_spliced_and_zero_ablated_ce_and_kl_match_hand_written_hooks():
    torch.manual_seed(1)
    model = TinyLM().eval()
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).eval()
    tokens = token_batch(torch.Generator().manual_seed(1))
    lm = LMEvaluator(model, sae, "layers.1", special_token_ids=[BOS, PAD])
    batch = lm.update(tokens)
    out = lm.compute()
    hook_module = model.layers[1]
    ce_clean, logits_clean, counted = reference_ce(model, tokens)
    with torch.no_grad():
        ce_sae, logits_sae, _ = reference_ce(model, tokens, lambda h: sae(h), hook_module)
        ce_zero, _, _ = reference_ce(model, tokens, torch.zeros_like, hook_module)
    p = logits_clean[:, :-1].log_softmax(-1).reshape(-1, logits_clean.shape[-1])[counted]
    q = logits_sae[:, :-1].log_softmax(-1).reshape(-1, logits_sae.shape[-1])[counted]
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert out["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert out["ce_sae"] == pytest.approx(ce_sae, abs=1e-5)
    assert out["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)
    assert out["kl_div"] == pytest.approx(kl, abs=1e-5)
    assert out["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-4)
    # the returned activations are the non-special positions only, with their reconstructions
    special = (tokens == BOS) | (tokens == PAD)
    assert batch.x.shape == (int((~special).sum()), 16)
    torch.testing.assert_close(batch.x_hat, sae(batch.x))


def test_splice_modes_and_mask_on_an_nn_module():
    torch.manual_seed(2)
    model = TinyLM().eval()
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).eval()
    tokens = token_batch(torch.Generator().manual_seed(2))
    mask = tokens != BOS
    with torch.no_grad(), spliced(model, sae, "layers.0", mode="zero", mask=mask) as splice:
        model(tokens)
        seen = splice.x
        zeroed = model.layers[1](torch.where(mask[..., None], torch.zeros_like(seen), seen))[0]
        torch.testing.assert_close(model(tokens), model.unembed(zeroed))
    with pytest.raises(ValueError, match="not a submodule"), spliced(model, sae, "layers.7"):
        pass
    with pytest.raises(ValueError, match="mask"), spliced(model, sae, "layers.0", mask=mask[:, :3]):
        model(tokens)


def test_feature_activations_stop_at_the_hook_and_match_encode():
    torch.manual_seed(3)
    model = TinyLM().eval()
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).eval()
    tokens = token_batch(torch.Generator().manual_seed(3))
    calls = []
    model.unembed.register_forward_hook(lambda *a: calls.append(1))
    z = feature_activations(model, sae, "layers.0", tokens)
    assert calls == []  # the forward pass stopped at the hook
    with torch.no_grad():
        h = model.layers[0](model.embed(tokens))[0]
        torch.testing.assert_close(z, sae.encode(h.reshape(-1, 16)).reshape(3, 12, 64))


def test_transformer_lens_model_identity_and_zero_ablation():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        d_model=24, n_layers=2, d_mlp=48, d_head=6, n_heads=4, n_ctx=16, d_vocab=37,
        act_fn="gelu", normalization_type="LN", seed=0, initializer_range=0.2,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    hook = "blocks.0.hook_resid_post"
    tokens = token_batch(torch.Generator().manual_seed(4))
    lm = LMEvaluator(model, identity_sae(24), hook, special_token_ids=[BOS, PAD])
    lm.update(tokens)
    out = lm.compute()
    special = (tokens == BOS) | (tokens == PAD)
    counted = (~special[:, :-1] & ~special[:, 1:]).reshape(-1)

    def ce_of(logits):
        ce = F.cross_entropy(
            logits[:, :-1].double().reshape(-1, 37), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return ce[counted].mean().item()

    with torch.no_grad():
        clean = ce_of(model(tokens))
        zero = ce_of(
            model.run_with_hooks(
                tokens, fwd_hooks=[(hook, lambda act, hook: torch.where(special[..., None], act, 0.0))]
            )
        )
    assert out["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert out["ce_sae"] == pytest.approx(clean, abs=1e-5)
    assert out["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_zero"] == pytest.approx(zero, abs=1e-5)
    assert abs(zero - clean) > 1e-3
    sae = TopKSAE(TopKConfig(d_in=24, d_sae=48, k=5)).eval()
    z = feature_activations(model, sae, hook, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        torch.testing.assert_close(z, sae.encode(cache[hook].reshape(-1, 24)).reshape(3, 12, 48))
    with pytest.raises(ValueError, match="not a hook point"), spliced(model, sae, "blocks.0.hook_nope"):
        pass


def test_spliced_keeps_special_tokens_by_default_as_eval_does():
    """An HF model's BOS / pad positions keep their activation (the ids come from its config), exactly as in
    a hand-written hook; keep_special_tokens=False substitutes every position."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=37, n_positions=16,
        bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).eval()
    tokens = token_batch(torch.Generator().manual_seed(5))
    special = (tokens == BOS) | (tokens == PAD)
    block = model.transformer.h[0]

    def by_hand(replace_all: bool) -> torch.Tensor:
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            keep = torch.zeros_like(special) if replace_all else special
            new = torch.where(keep[..., None], h, sae(h))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = block.register_forward_hook(hook)
        try:
            return model(tokens).logits
        finally:
            handle.remove()

    with torch.no_grad():
        with spliced(model, sae, "transformer.h.0"):
            default = model(input_ids=tokens).logits
        with spliced(model, sae, "transformer.h.0", keep_special_tokens=False):
            everywhere = model(tokens).logits
        want_default, want_everywhere = by_hand(False), by_hand(True)
    torch.testing.assert_close(default, want_default)
    torch.testing.assert_close(everywhere, want_everywhere)
    assert (default - everywhere).abs().max() > 1e-3  # the BOS position's substitution matters


def test_spliced_without_token_ids_asks_for_them():
    """A forward pass on embeddings (no token ids) cannot tell special tokens: the splice says so."""
    torch.manual_seed(6)
    block = Block(16).eval()
    model = nn.Sequential(block)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).eval()
    x = torch.randn(2, 5, 16)
    with (
        torch.no_grad(),
        spliced(model, sae, "0", special_token_ids=[BOS]),
        pytest.raises(ValueError, match="needs the token ids.*keep_special_tokens=False"),
    ):
        model(x)
    with torch.no_grad():
        want = sae(block(x)[0])
        with spliced(model, sae, "0", special_token_ids=[BOS], keep_special_tokens=False):
            torch.testing.assert_close(model(x)[0], want)
