"""Matryoshka BatchTopK SAE: the nested-prefix loss and its gradient against a float64 dense loop, the
grouped code layout against a per-row loop, group sizes and loss against dictionary_learning's own trainer,
save/load (saelab, SAELens, dictionary_learning), and training on hierarchical planted data."""

from __future__ import annotations

import json

import pytest
import torch
from test_interop_dictionary_learning import import_peer

from saelab import load_sae
from saelab.app.cli import main
from saelab.io import export_dictionary_learning
from saelab.kernels import backend
from saelab.kernels.auxk import dead_latent_list
from saelab.sae.base import TrainContext
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE, codes_by_group, sizes_from_fractions
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

D, N, K = 6, 24, 3
SIZES = [3, 5, 6, 10]

try:
    PEER = import_peer()
    WHY = "dictionary-learning is not installed (pip install --no-deps dictionary-learning)"
except ImportError as err:
    PEER, WHY = None, f"dictionary-learning's SAE classes did not import ({err})"
needs_peer = pytest.mark.skipif(PEER is None, reason=WHY)


def make_sae(seed: int = 0, sizes=SIZES, k: int = K, aux_k: int = 4) -> MatryoshkaSAE:
    gen = torch.Generator().manual_seed(seed)
    cfg = MatryoshkaConfig(d_in=D, d_sae=sum(sizes), k=k, aux_k=aux_k, group_sizes=sizes, dtype="float64")
    sae = MatryoshkaSAE(cfg, gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=gen, dtype=torch.float64) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=gen, dtype=torch.float64) * 0.5)
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1, generator=gen, dtype=torch.float64) + 0.5)
    return sae


def batch(seed: int, rows: int = 10) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def reference_loss(params: dict[str, torch.Tensor], x, k, sizes, dead, aux_k, aux_coef) -> torch.Tensor:
    """The Matryoshka loss by its definition, in float64 with dense matrices and Python loops: codes keep the
    batch's B*k largest pre-activations (ReLU'd), prefix m reconstructs from the first m latents only, the loss
    is the mean of the prefix FVUs plus aux_coef * AuxK on the full dictionary's residual."""
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = (x - b_dec) @ W_enc + b_enc
    flat = pre.detach().tolist()
    entries = sorted(((v, b, i) for b, row in enumerate(flat) for i, v in enumerate(row)), reverse=True)
    keep = torch.zeros_like(pre, dtype=torch.bool)
    for _, b, i in entries[: len(flat) * k]:
        keep[b, i] = True
    z = torch.where(keep, pre, 0.0).relu()
    denominator = (x - x.mean(dim=0)).pow(2).sum()
    fvus, end = [], 0
    for size in sizes:
        end += size
        x_hat = z[:, :end] @ W_dec[:end] + b_dec
        fvus.append((x - x_hat).pow(2).sum() / denominator)
    loss = sum(fvus) / len(fvus)
    n_dead = int(dead.sum())
    if n_dead and aux_coef:
        dead_ids = dead.nonzero().squeeze(1).tolist()
        aux = torch.zeros_like(pre, dtype=torch.bool)
        for b, row in enumerate(flat):
            for i in sorted(dead_ids, key=lambda i: row[i], reverse=True)[:aux_k]:
                aux[b, i] = True
        residual = (x - x_hat).detach()
        residual_hat = torch.where(aux, pre, 0.0).relu() @ W_dec
        centred = (residual - residual.mean(dim=0)).pow(2).sum()
        auxk = min(n_dead / aux_k, 1.0) * (residual - residual_hat).pow(2).sum() / centred
        loss = loss + aux_coef * auxk
    return loss


def context(dead: torch.Tensor, listed: bool) -> TrainContext:
    return TrainContext(0, 10, dead, bool(dead.any()), dead_latent_list(dead) if listed else None)


@pytest.mark.parametrize(
    ("dead_ids", "auxk_path"),
    [((), "sparse"), ((1, 7, 8, 15, 20, 23), "sparse"), ((1, 7, 8, 15, 20, 23), "dense"), ((4, 9), "sparse")],
)
def test_loss_and_gradient_match_a_dense_loop_over_prefixes(dead_ids, auxk_path):
    sae = make_sae()
    x = batch(1)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[list(dead_ids)] = True
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    expected = reference_loss(params, x, K, SIZES, dead, sae.aux_k, sae.cfg.aux_k_coef)
    expected.backward()
    with backend.override(SAELAB_AUXK=auxk_path):
        out = sae.training_forward(x, context(dead, listed=auxk_path == "dense"))
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert ("auxk" in out.metrics) == bool(dead_ids)


def test_one_group_is_batchtopk():
    x = batch(2, rows=16)
    ours = make_sae(sizes=[N])
    plain = BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=N, k=K, aux_k=4, dtype="float64"))
    plain.load_state_dict(ours.state_dict())
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    outs = [sae.training_forward(x, context(dead, False)) for sae in (ours, plain)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    torch.testing.assert_close(outs[0].x_hat, outs[1].x_hat)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, getattr(plain, name).grad, msg=name)


def test_codes_by_group_keeps_every_code_in_its_group():
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(9, 7, generator=gen)
    values[values < 0.3] = 0.0  # BatchTopK's zero padding
    indices = torch.stack([torch.randperm(N, generator=gen)[:7] for _ in range(9)])
    starts = torch.tensor([3, 8, 14])
    out_values, out_indices, widths = codes_by_group(values, indices, starts)
    bounds = [0, 3, 8, 14, N]
    expected_widths = []
    for g in range(4):
        per_row = [
            sorted(
                (int(i), float(v))
                for i, v in zip(indices[b], values[b], strict=True)
                if v > 0 and bounds[g] <= i < bounds[g + 1]
            )
            for b in range(9)
        ]
        expected_widths.append(max(1, max(len(r) for r in per_row)))
        first = sum(expected_widths[:g])
        for b in range(9):
            cols = slice(first, first + expected_widths[g])
            got = [
                (int(i), float(v))
                for i, v in zip(out_indices[b, cols], out_values[b, cols], strict=True)
                if v > 0
            ]
            assert sorted(got) == per_row[b], (g, b)
            assert int((out_values[b, cols] > 0).sum()) == len(per_row[b])
    assert widths == tuple(expected_widths)
    assert out_values.shape == (9, sum(expected_widths))


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="sae.group_sizes=.*add up to 20.*d_sae=24"):
        MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=N, k=K, group_sizes=[10, 10]))
    with pytest.raises(ValueError, match=r"sae.group_sizes\[1\]"):
        MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=N, k=K, group_sizes=[24, 0]))
    with pytest.raises(ValueError, match="sae.group_fractions=.*add up to"):
        MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=N, k=K, group_fractions=[0.5, 0.25]))
    with pytest.raises(ValueError, match="every group needs at least one latent"):
        MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=N, k=K, group_fractions=[0.01, 0.99]))
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=64, k=K))
    assert sae.group_sizes == [8, 8, 16, 32]


def trained_like(seed: int = 0, threshold: float = 0.2) -> MatryoshkaSAE:
    sae = make_sae(seed)
    sae.threshold.fill_(threshold)
    return sae.eval()


def test_saves_and_loads_with_its_group_sizes(tmp_path):
    sae = trained_like()
    sae.cfg.group_sizes = []  # sizes from fractions at this width...
    sae.cfg.group_fractions = [0.125, 0.125, 0.25, 0.5]
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["saelab_architecture"] == "matryoshka" and cfg["architecture"] == "jumprelu"
    assert cfg["group_sizes"] == [3, 3, 6, 12]  # ...are written out resolved
    back = load_sae(tmp_path / "s")
    assert isinstance(back, MatryoshkaSAE) and back.group_sizes == [3, 3, 6, 12]
    x = batch(4)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), pre * (pre > 0.2))  # BatchTopK's threshold rule
        torch.testing.assert_close(back(x), sae(x))


def test_saelens_loads_it_as_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_like()
    sae.save(tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "s", dtype="float64")
    assert type(theirs).__name__ == "JumpReLUSAE"
    x = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x))


def test_exports_to_dictionary_learning_and_loads_back(tmp_path):
    sae = trained_like()
    export_dictionary_learning(sae, tmp_path / "dl")
    config = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert config["dict_class"] == "MatryoshkaBatchTopKSAE" and config["k"] == K
    assert config["group_fractions"] == pytest.approx([size / N for size in SIZES])  # explicit sizes: shares
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    assert state["group_sizes"].tolist() == SIZES and int(state["k"]) == K
    assert float(state["threshold"]) == pytest.approx(0.2)
    back = load_sae(tmp_path / "dl")
    assert isinstance(back, MatryoshkaSAE) and back.group_sizes == SIZES and back.cfg.k == K
    x = batch(6)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x).double(), sae.encode(x), rtol=1e-6, atol=1e-6)


@needs_peer
def test_dictionary_learning_class_gives_the_same_codes(tmp_path):
    sae = trained_like()
    export_dictionary_learning(sae, tmp_path / "dl")
    theirs = PEER["MatryoshkaBatchTopKSAE"].from_pretrained(tmp_path / "dl" / "ae.pt")
    assert theirs.group_sizes.tolist() == SIZES
    x = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x.float()).double(), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x.float()).double(), sae(x), rtol=1e-5, atol=1e-5)


def test_dictionary_learning_config_records_the_fractions_its_trainer_would_take(tmp_path):
    fractions = [1 / 8, 1 / 8, 1 / 4, 1 / 2]
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=40, k=K, group_fractions=fractions))
    sae.threshold.fill_(0.2)  # as after training
    export_dictionary_learning(sae, tmp_path / "dl")
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert trainer["group_fractions"] == fractions
    back = load_sae(tmp_path / "dl")
    assert back.group_sizes == [5, 5, 10, 20] and back.cfg.group_fractions == fractions


def peer_trainer(dict_size: int, fractions: list[float]):
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    return MatryoshkaBatchTopKTrainer(
        steps=10, warmup_steps=1, activation_dim=D, dict_size=dict_size, k=K, layer=0, lm_name="toy",
        group_fractions=fractions, device="cpu", seed=0,
    )  # fmt: skip


@needs_peer
@pytest.mark.parametrize(
    ("n", "fractions"), [(37, [0.1, 0.2, 0.3, 0.4]), (64, [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2])]
)
def test_group_sizes_from_fractions_as_dictionary_learning(n, fractions):
    assert sizes_from_fractions(fractions, n) == peer_trainer(n, fractions).group_sizes


@needs_peer
def test_loss_and_gradient_match_dictionary_learning_trainer_up_to_its_scale():
    """dictionary_learning's reconstruction loss is mean_g (1/G) * mean_b ||x - x_hat_g||^2 (no dead latents
    at its step 0, so no AuxK); saelab's is mean_g FVU_g: the same up to the factor G * B / sum ||x - mean x||^2."""
    sae = make_sae(sizes=[6, 6, 12])
    trainer = peer_trainer(N, [0.25, 0.25, 0.5])
    assert trainer.ae.group_sizes.tolist() == [6, 6, 12]
    trainer.ae.double().load_state_dict(
        {**{n: p.detach() for n, p in sae.named_parameters()}, "k": trainer.ae.k, "threshold": trainer.ae.threshold,
         "group_sizes": trainer.ae.group_sizes}
    )  # fmt: skip
    x = batch(8, rows=12)
    theirs = trainer.loss(x, step=0)
    theirs.backward()
    ours = sae.training_forward(x, context(torch.zeros(N, dtype=torch.bool), False)).loss
    ours.backward()
    scale = 3 * x.shape[0] / (x - x.mean(dim=0)).pow(2).sum()
    torch.testing.assert_close(ours.detach(), theirs.detach() * scale)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, getattr(trainer.ae, name).grad * scale, msg=name)


def test_trains_on_hierarchical_planted_data_with_the_parents_in_the_first_group(one_thread):
    """20 parents with 4 children each. The first group (32 of 128 latents) must reconstruct alone, so it takes
    the parents: 80% of them have a first-group decoder row at cosine >= 0.9 (seeds 1-3: 65-85%), where a
    BatchTopK SAE trained alike has 15-20% of them among any 32 latents (2 recovered parents in 3 elsewhere)."""
    data = SyntheticConfig(d_in=32, n_features=100, mean_active=2.0, structure="hierarchical", seed=2)
    source = SyntheticSource(data)
    cfg = MatryoshkaConfig(d_in=32, d_sae=128, k=4, group_fractions=[0.25, 0.75])
    sae = MatryoshkaSAE(cfg, torch.Generator().manual_seed(2))
    run = TrainerConfig(total_tokens=300 * 256, batch_size=256, lr=0.01, device="cpu", log_every=300)
    trained = Trainer(sae, run).fit(source).sae
    x = source.batch(10**7, 2048)  # held out: training reads batches 0..299
    with torch.no_grad():
        fvu = float((x - trained(x)).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
    assert fvu < 0.2 and float(trained.threshold) > 0
    parents = source.features[: data.n_parents]
    assert recovery_metrics(parents, trained.W_dec.detach()[:32])["frac_recovered"] >= 0.5


def test_a_dictionary_learning_folder_with_inconsistent_group_sizes_is_refused(tmp_path):
    sae = trained_like()
    export_dictionary_learning(sae, tmp_path / "dl")
    state = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    torch.save(
        {**state, "group_sizes": torch.tensor([3, 5, 6])}, tmp_path / "dl" / "ae.pt"
    )  # sums to 14, not 24
    with pytest.raises(ValueError, match="sae.group_sizes=.*add up to 14.*d_sae=24"):
        load_sae(tmp_path / "dl")


def test_a_prefix_is_the_nested_sae_training_fitted():
    sae = trained_like()
    x = batch(9)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = pre * (pre > 0.2)
    for groups, m in ((1, 3), (2, 8), (4, N)):
        small = sae.prefix(groups)
        assert small.d_sae == m and small.group_sizes == SIZES[:groups] and float(small.threshold) == 0.2
        with torch.no_grad():
            torch.testing.assert_close(small.encode(x), z[:, :m])
            torch.testing.assert_close(small(x), z[:, :m] @ sae.W_dec[:m] + sae.b_dec)
    with pytest.raises(ValueError, match="groups=5 must be in"):
        sae.prefix(5)


def test_trains_from_the_cli_with_its_yaml(tmp_path, one_thread):
    main([
        "train", "sae=matryoshka", "sae.k=4", "sae.expansion_factor=4", "sae.group_fractions=[0.25,0.75]",
        "source.d_in=16", "source.n_features=32", "trainer.total_tokens=4096", "trainer.batch_size=512",
        "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={tmp_path}",
    ])  # fmt: skip
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, MatryoshkaSAE) and sae.group_sizes == [16, 48] and float(sae.threshold) > 0
