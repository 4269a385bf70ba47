"""Feature absorption against planted ground truth, and the logistic probes against closed forms and optimality."""

import math

import pytest
import torch
from torch.nn import functional as F

from saelab.eval.absorption import absorption_metrics, letter_probe_f1, train_letter_probes, word_absorption
from saelab.eval.config import AbsorptionConfig
from saelab.eval.first_letter import LETTERS, FirstLetterData, build_prompts, letter_of
from saelab.eval.logistic import (
    fit_l1_logistic_ovr,
    fit_logistic,
    fit_logistic_ovr,
    ovr_smooth,
    pos_weights,
)
from saelab.sae.relu import ReLUConfig, ReLUSAE

N_LETTERS = len(LETTERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny float64 solves: a second thread only syncs


WORDS_PER_LETTER = 12  # 9 train + 3 test per letter
ABSORBED = {"train": [0, 1], "test": [0]}  # indices (within a letter's split) of letter "a" words absorbed


def planted_first_letter() -> tuple[FirstLetterData, ReLUSAE, int]:
    """Words x = u_letter (+ v_word for the absorbed words of letter "a"), in d = 26 + #absorbed dims.

    The SAE has a general latent per letter (encoder u_c, decoder u_c; letter a's encoder is u_a minus
    2 v_w for every absorbing direction, so it stays silent on absorbed words) and one token-specific
    latent per absorbed word (encoder v_w, decoder (u_a + v_w) / sqrt 2). The a-probe never sees the test
    words' v_w, so on an absorbed test word the general latent is silent and the token latent carries all of
    the probe projection: full absorption, fraction 1. Returns the data, the SAE and the number of absorbed
    test words of letter a.
    """
    n_absorbed = len(ABSORBED["train"]) + len(ABSORBED["test"])
    d = N_LETTERS + n_absorbed
    acts, labels, train = [], [], []
    extra = iter(range(N_LETTERS, d))
    absorbing_dirs = []
    for c in range(N_LETTERS):
        for i in range(WORDS_PER_LETTER):
            is_train = i < 9
            x = torch.zeros(d)
            x[c] = 1.0 + 0.01 * i  # a little spread so the probes are not degenerate
            within = i if is_train else i - 9
            if c == 0 and within in ABSORBED["train" if is_train else "test"]:
                v = next(extra)
                x[v] = 1.0
                absorbing_dirs.append(v)
            acts.append(x)
            labels.append(c)
            train.append(is_train)
    n = N_LETTERS + n_absorbed
    sae = ReLUSAE(ReLUConfig(d_in=d, d_sae=n))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        for c in range(N_LETTERS):
            sae.W_enc[c, c] = 1.0
            sae.W_dec[c, c] = 1.0
        for j, v in enumerate(absorbing_dirs):
            latent = N_LETTERS + j
            sae.W_enc[v, 0] = -2.0  # the general "a" latent is silenced by every absorbing direction
            sae.W_enc[v, latent] = 1.0
            sae.W_dec[latent, 0] = sae.W_dec[latent, v] = 1 / math.sqrt(2)
    words = [f"w{i}" for i in range(len(acts))]
    data = FirstLetterData(torch.stack(acts), torch.tensor(labels), torch.tensor(train), words)
    return data, sae, len(ABSORBED["test"])


def test_planted_absorption_matches_its_known_rate():
    data, sae, absorbed_test = planted_first_letter()
    cfg = AbsorptionConfig(min_letters=N_LETTERS, max_k_value=2)
    probe = train_letter_probes(data, cfg.probe_l2)
    f1 = letter_probe_f1(probe, data)
    assert min(f1) == 1.0  # every letter's probe finds its 3 test words and nothing else
    result = absorption_metrics(sae, data, probe, f1, cfg)
    details = {row["first_letter"]: row for row in result["eval_result_details"]}
    a = details["a"]
    assert a["split_features"] == [0]  # the general latent; no token latent passes the F1-jump rule
    assert a["num_probe_true_positives"] == 3
    assert a["num_full_absorption"] == absorbed_test
    assert a["full_absorption_rate"] == pytest.approx(absorbed_test / 3)
    assert a["mean_absorption_fraction"] == pytest.approx(absorbed_test / 3)
    others = [row for letter, row in details.items() if letter != "a"]
    assert len(others) == N_LETTERS - 1 and all(
        row["split_features"] == [LETTERS.index(row["first_letter"])] for row in others
    )
    assert all(row["mean_absorption_fraction"] == 0 and row["num_full_absorption"] == 0 for row in others)
    mean = result["eval_result_metrics"]["mean"]
    assert mean["mean_full_absorption_score"] == pytest.approx(absorbed_test / 3 / N_LETTERS)


def test_word_absorption_partial_case_by_hand():
    """One word, probe along e0: main latent carries 0.3 of the projection, two absorbers 0.5 and 0.4 (only
    the top max_absorbing_latents=1 count): fraction = min(0.5, 1 - 0.3) / (0.5 + 0.3)."""
    cfg = AbsorptionConfig(max_absorbing_latents=1)
    x = torch.tensor([[1.0, 0.0, 0.0]])
    W_dec = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6], [0.0, 0.0, 1.0]])
    z = torch.tensor([[0.3, 0.5 / 0.6, 0.4 / 0.8, 5.0]])  # z_j * cos_j = 0.3, 0.5, 0.4, 0
    fraction, full = word_absorption(x, z, torch.tensor([2.0, 0.0, 0.0]), W_dec, [0], cfg)
    assert fraction.item() == pytest.approx(0.5 / 0.8)
    assert not full.item()  # the main latent fires
    fraction, full = word_absorption(
        x, z * torch.tensor([[0.0, 1, 1, 1]]), torch.tensor([1.0, 0, 0]), W_dec, [0], cfg
    )
    assert fraction.item() == 1.0 and full.item()  # main silent, top absorber 0.5 / 1 >= 0.4


def test_spelling_prompts_put_the_word_token_at_its_position():
    class Tokenizer:  # one id per character: the prompt's text is recoverable
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in text]}

    words = [(1000 + i, text) for i, text in enumerate([" cat", "Dog", " emu", "fox"])]
    cfg = AbsorptionConfig(max_icl_examples=2, prompt_template="{word} starts with:")
    prompts, positions = build_prompts(Tokenizer(), words, cfg, 7, torch.Generator().manual_seed(0))
    for (word_id, _), ids, pos in zip(words, prompts, positions, strict=True):
        assert ids[0] == 7 and ids[pos] == word_id
        text = "".join(chr(t) if t < 1000 else f"<{t}>" for t in ids[1:])
        lines = text.split("\n")
        assert lines[0] == "" and len(lines) == 4 and lines[-1] == f"<{word_id}> starts with:"
        for line in lines[1:3]:  # examples: another word and its capitalised first letter
            example = int(line[1:5])
            assert example != word_id
            assert line.endswith(f" starts with: {LETTERS[letter_of(words[example - 1000][1])].upper()}")


def test_logistic_matches_the_closed_form_of_a_binary_feature():
    """With one 0/1 feature and (almost) no penalty, the optimum is the two groups' log-odds."""
    x = torch.tensor([0.0] * 30 + [1.0] * 50)[:, None]
    y = torch.tensor([1] * 10 + [0] * 20 + [1] * 40 + [0] * 10)
    probe = fit_logistic(x, y, C=1e9)
    assert probe.bias.item() == pytest.approx(math.log(10 / 20), abs=1e-6)
    assert probe.weight.item() == pytest.approx(math.log(40 / 10) - math.log(10 / 20), abs=1e-6)
    balanced = fit_logistic(
        x, y, C=1e9, balanced=True
    )  # class weights N / (2 N_y): positives 80/100, negatives 80/60
    w_pos, w_neg = 80 / 100, 80 / 60
    b = math.log(10 * w_pos / (20 * w_neg))
    assert balanced.bias.item() == pytest.approx(b, abs=1e-6)
    assert balanced.weight.item() == pytest.approx(math.log(40 * w_pos / (10 * w_neg)) - b, abs=1e-6)


def test_newton_and_lbfgs_reach_the_same_float64_optimum(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 40, generator=g)
    y = x @ torch.randn(40, generator=g) + torch.randn(300, generator=g) > 0
    newton = fit_logistic(x, y, C=0.3, balanced=True)
    monkeypatch.setattr("saelab.eval.logistic.NEWTON_MAX_DIM", 1)
    lbfgs = fit_logistic(x, y, C=0.3, balanced=True)
    assert torch.allclose(newton.weight, lbfgs.weight, atol=1e-5) and abs(newton.bias - lbfgs.bias) < 1e-5
    w = newton.weight.clone().requires_grad_(True)  # the gradient of the objective vanishes there
    s = torch.where(y, 300 / (2 * y.sum()), 300 / (2 * (~y).sum())).double()
    loss = (
        0.3
        * (
            s * F.binary_cross_entropy_with_logits(x.double() @ w + newton.bias, y.double(), reduction="none")
        ).sum()
    )
    (grad,) = torch.autograd.grad(loss + 0.5 * w.dot(w), w)
    assert grad.abs().max() < 1e-6


def test_ovr_and_l1_probes_satisfy_their_optimality_conditions():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (200,), generator=g)
    z = torch.relu(torch.randn(200, 30, generator=g) - 1.5)
    z[torch.arange(200), labels * 5] += 2.0  # latent 5c marks class c
    y = F.one_hot(labels, 4).double()
    pw = pos_weights(y)
    l1 = fit_l1_logistic_ovr(z.to_sparse_csr(), y, l1=0.01, l2=1e-6, max_iter=5000, tol=1e-8)
    W = l1.weight.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ovr_smooth(z.double() @ W.T + l1.bias, y, pw) + 0.5e-6 * W.pow(2).sum(), W)
    shrink = 0.01 / 4
    nonzero = l1.weight != 0
    assert (grad[nonzero] + shrink * l1.weight[nonzero].sign()).abs().max() < 1e-2 * shrink
    assert (grad[~nonzero].abs() <= shrink * (1 + 1e-3)).all()  # subgradient condition at zero weights
    assert l1.weight.argmax(dim=1).tolist() == [0, 5, 10, 15]
    ovr = fit_logistic_ovr(z, y, l2=1e-3)
    W = ovr.weight.clone().requires_grad_(True)
    b = ovr.bias.clone().requires_grad_(True)
    loss = ovr_smooth(z.double() @ W.T + b, y, pw) + 0.5e-3 * W.pow(2).sum()
    assert max(g.abs().max() for g in torch.autograd.grad(loss, (W, b))) < 1e-9
