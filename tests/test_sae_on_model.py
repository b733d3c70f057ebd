"""Training from a model: one pass trains every hook point; metrics; the CLI; the SmolLM2 quality bar."""

import math
import os
import subprocess
import sys

import pytest
import torch

from sae_engine.checkpoints import load_saelens
from sae_engine.hooks import capture_activations
from sae_engine.metrics import evaluate_saes
from sae_engine.models import LoadedModel
from sae_engine.tokens import pack_texts, special_ids, training_mask
from sae_engine.training import MultiSAETrainer, SAETrainConfig, fvu

TEXTS = [f"Document {i}: the {w} sat near the {v} while it rained over the {u}." for i, (w, v, u) in enumerate(
    [("cat", "door", "city"), ("dog", "window", "field"), ("bird", "tree", "sea"), ("fox", "hill", "town")] * 40)]


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LoadedModel:
    from sae_engine.models import from_config, tiny_llama_config

    config = tiny_llama_config(tokenizer, max_position_embeddings=2048)
    model = from_config(config).float()
    return LoadedModel(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32)


def test_one_pass_trains_every_hook_point_and_metrics_are_sane(tiny):
    points = ["blocks.1.hook_mlp_out", "blocks.3.hook_resid_post"]
    config = SAETrainConfig(k=8, expansion_factor=4, batch_size=256, compute_dtype="float32")
    trainer = MultiSAETrainer(tiny, points, config)
    forwards = []
    handle = tiny.model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trained = trainer.train(pack_texts(TEXTS, tiny.tokenizer, 32, 8))
    handle.remove()
    n_batches = len(list(pack_texts(TEXTS, tiny.tokenizer, 32, 8)))
    assert len(forwards) == n_batches, "one model pass per batch feeds both SAEs"
    assert set(trained) == set(points)
    for result in trained.values():
        assert result.tokens_trained > 0
        assert result.sae.metadata["hook_name"] in points
    metrics = evaluate_saes(tiny, {p: trained[p].sae for p in points}, pack_texts(TEXTS[:20], tiny.tokenizer, 32, 4))
    for m in metrics.values():
        assert 0 < m.fvu < 1.5
        assert 0 < m.l0 <= 8
        assert math.isfinite(m.ce_increase) and m.ce_zero > 0
        assert sum(m.density_histogram["counts"]) + m.density_histogram["dead"] == 256


def test_training_mask_drops_special_and_outlier_tokens(tokenizer):
    ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id, 100, 101, 102]])
    acts = torch.ones(1, 4, 8)
    acts[0, 3] *= 1000
    keep = training_mask(acts, ids, torch.ones_like(ids), special_ids(tokenizer), 10.0)
    assert keep.tolist() == [[False, True, True, False]]


def test_train_sae_cli_writes_loadable_folders_and_rejects_bad_options(tiny, tmp_path, data_dir):
    model_dir = tmp_path / "tiny-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    cmd = [sys.executable, "-m", "starmap.cli", "--model", str(model_dir), "--dtype", "float32", "train-sae",
           "--texts", str(texts), "--tokens", "2000", "--k", "4", "--expansion-factor", "2", "--batch-size", "128",
           "-p", "blocks.2.hook_mlp_out", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = load_saelens(tmp_path / "out" / "blocks.2.hook_mlp_out", expect_d_in=64)
    assert loaded.sae.k == 4 and loaded.hook_name == "blocks.2.hook_mlp_out"
    bad = subprocess.run(cmd[:-4] + ["-p", "blocks.2.mlp", "--out", str(tmp_path / "x")], check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "bad hook point 'blocks.2.mlp'" in bad.stderr

    # Under torchrun, 2 gloo ranks collect activations from alternate model batches and train one SAE on all of them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole_text = [("8000" if part == "2000" else part) for part in cmd[2:-1]]
    runs = {}
    for name, launcher in (("single", []), ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        done = subprocess.run([sys.executable, *launcher, "-m", *whole_text, str(tmp_path / name)], check=False,
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = load_saelens(tmp_path / name / "blocks.2.hook_mlp_out", expect_d_in=64)
    loaded, parallel = runs["single"], runs["ddp"]
    assert parallel.sae.metadata["training_tokens"] == loaded.sae.metadata["training_tokens"] > 2000
    acts = capture_activations(tiny.model, ["blocks.2.hook_mlp_out"], pack_texts(TEXTS[:16], tiny.tokenizer, 32, 16)
                               .__next__().input_ids)["blocks.2.hook_mlp_out"].reshape(-1, 64).float()
    with torch.no_grad():
        one, two = (float(fvu(acts, sae.sae(acts))) for sae in (loaded, parallel))
    assert one < 1 and two < 1 and abs(one - two) < 0.2, (one, two)


@pytest.mark.slow
def test_smollm2_sae_beats_pca_at_equal_sparsity(smollm2):
    """60k tokens of blocks.14.hook_mlp_out, k=64, expansion 10: held-out FVU below PCA with L0 components."""
    from bench.bench_sae import bench_texts
    from starmap.settings import get_settings

    hook = "blocks.14.hook_mlp_out"
    config = SAETrainConfig(k=64, expansion_factor=10, batch_size=1024, lr=1e-3)
    texts = bench_texts(get_settings().data_dir)
    batches = pack_texts(texts, smollm2.tokenizer, 128, 16)
    trainer = MultiSAETrainer(smollm2, [hook], config)
    sae = trainer.train(batches, total_tokens=60_000)[hook].sae
    held_out = []
    for batch in batches:  # the generator continues past the training tokens: held-out text
        acts = capture_activations(smollm2.model, [hook], batch.input_ids, batch.attention_mask)[hook]
        keep = training_mask(acts, batch.input_ids, batch.attention_mask, special_ids(smollm2.tokenizer), 10.0)
        held_out.append(acts[keep].float())
        if sum(len(h) for h in held_out) >= 8192:
            break
    x = torch.cat(held_out)
    with torch.no_grad():
        z = sae.encode(x)
        l0 = float((z > 0).sum(-1).float().mean())
        sae_fvu = float((sae.decode(z) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    basis = v[: round(l0)]
    pca_fvu = float((centred - centred @ basis.T @ basis).pow(2).sum() / centred.pow(2).sum())
    print(f"held-out FVU: SAE {sae_fvu:.3f} (L0 {l0:.1f}) vs PCA-{round(l0)} {pca_fvu:.3f}")
    assert sae_fvu < pca_fvu
