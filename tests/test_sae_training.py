"""The TopK SAE and its trainer: sparse/dense agreement, planted-dictionary recovery, normalisation folding."""

import torch

from sae_engine.topk import TopKSAE
from sae_engine.training import SAETrainConfig, SAETrainer, fvu, geometric_median


def _loss_and_grads(sae: TopKSAE, x: torch.Tensor, forward) -> tuple[float, list[torch.Tensor]]:
    sae.zero_grad()
    loss = fvu(x, forward(x))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec)]


def test_sparse_and_dense_paths_agree_on_loss_and_gradients():
    torch.manual_seed(0)
    sae = TopKSAE(48, 480, 12)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(300, 48)
    sparse_loss, sparse_grads = _loss_and_grads(sae, x, sae.forward)
    dense_loss, dense_grads = _loss_and_grads(sae, x, sae.forward_dense)
    assert abs(sparse_loss - dense_loss) < 1e-6
    for name, a, b in zip(("W_enc", "W_dec", "b_enc", "b_dec"), sparse_grads, dense_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name
        assert a.abs().sum() > 0, name


def test_sparse_path_gradient_reaches_the_input():
    torch.manual_seed(2)
    sae = TopKSAE(24, 96, 5)
    x = torch.randn(40, 24)
    grads = []
    for forward in (sae.forward, sae.forward_dense):
        leaf = x.clone().requires_grad_()
        (forward(leaf) * torch.linspace(-1, 1, 24)).sum().backward()
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0


def test_topk_encoding_has_at_most_k_nonzeros_and_matches_dense():
    torch.manual_seed(1)
    sae = TopKSAE(32, 256, 7)
    x = torch.randn(50, 32)
    dense = sae.encode(x)
    assert ((dense > 0).sum(-1) <= 7).all()
    top = sae.encode_topk(x)
    rebuilt = torch.zeros_like(dense).scatter(-1, top.indices, top.values)
    assert torch.allclose(rebuilt, dense, atol=1e-6)


def _planted_data(n: int, dictionary: torch.Tensor, active: int, generator: torch.Generator) -> torch.Tensor:
    n_true = len(dictionary)
    idx = torch.stack([torch.randperm(n_true, generator=generator)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=generator) * 2 + 0.5
    return torch.einsum("na,nad->nd", coef, dictionary[idx])


def test_planted_dictionary_is_recovered():
    """Data made of known sparse unit features: each true feature has a near-parallel decoder row."""
    generator = torch.Generator().manual_seed(0)
    d_in, n_true, active = 32, 96, 3
    dictionary = torch.randn(n_true, d_in, generator=generator)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    config = SAETrainConfig(k=4, expansion_factor=6, batch_size=512, lr=3e-3, dead_after_tokens=20_000, compute_dtype="float32")
    trainer = SAETrainer(d_in, "synthetic", config)
    for _ in range(1200):
        trainer.step(_planted_data(512, dictionary, active, generator))
    decoder = trainer.sae.W_dec.detach()
    cosine = (dictionary @ (decoder / decoder.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert cosine.mean() >= 0.9, f"mean best cosine {cosine.mean():.3f}"


def test_saved_weights_work_on_raw_activations():
    """The training-time normalisation is folded in: the finished SAE encodes raw activations identically."""
    torch.manual_seed(2)
    x = torch.randn(2048, 16) * 40 + 5
    trainer = SAETrainer(16, "raw", SAETrainConfig(k=4, expansion_factor=4, batch_size=512, compute_dtype="float32"))
    for chunk in x.split(512):
        trainer.step(chunk)
    trained = trainer.finish("test-model", context_size=8)
    scale = trainer.scale
    normalised = trainer.sae.encode(x / scale) * scale
    assert torch.allclose(trained.sae.encode(x), normalised, rtol=1e-4, atol=1e-3)
    assert torch.allclose(trained.sae.forward_dense(x), trainer.sae.forward_dense(x / scale) * scale, rtol=1e-4, atol=1e-2)


def test_decoder_rows_stay_unit_norm_and_dead_latents_get_auxk_gradient():
    torch.manual_seed(3)
    config = SAETrainConfig(k=1, expansion_factor=32, batch_size=64, dead_after_tokens=64, compute_dtype="float32")
    trainer = SAETrainer(16, "aux", config)
    for _ in range(3):
        stats = trainer.step(torch.randn(64, 16))
    norms = trainer.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert stats.dead_fraction > 0
    assert stats.auxk > 0
    never_fired = trainer.fired_count == 0
    assert never_fired.any()
    assert trainer.sae.W_dec.grad[never_fired].abs().sum() > 0


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 4) * 0.1, torch.full((20, 4), 1000.0)])
    assert geometric_median(points).norm() < 1.0
    assert points.mean(0).norm() > 50
