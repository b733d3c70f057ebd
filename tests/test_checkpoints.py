"""Checkpoints: SAELens interoperability both ways, the Safe-SAIL layout, and refusal of bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_engine.checkpoints import (
    CheckpointError,
    load_saelens,
    load_safe_sail,
    save_saelens,
)
from sae_engine.topk import TopKSAE


def _random_sae(d_in=24, d_sae=96, k=6, seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.feature_density = torch.rand(d_sae)
    return sae


def test_our_checkpoint_loads_in_sae_lens_and_encodes_identically(tmp_path):
    from sae_lens import SAE

    ours = _random_sae()
    folder = save_saelens(ours, tmp_path / "blocks.3.hook_mlp_out", "blocks.3.hook_mlp_out", "tiny-llama")
    theirs = SAE.load_from_disk(str(folder))
    assert theirs.cfg.k == ours.k
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_mlp_out"
    x = torch.randn(40, 24)
    assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
    assert torch.allclose(theirs.decode(theirs.encode(x)), ours.forward_dense(x), atol=1e-5)


def test_sae_lens_checkpoint_loads_in_ours_and_encodes_identically(tmp_path):
    from sae_lens import SAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = TopKSAEConfig(d_in=20, d_sae=80, k=5, dtype="float32", device="cpu",
                        metadata=SAEMetadata(model_name="someone-else", hook_name="blocks.1.hook_resid_post"))
    theirs = SAE.from_dict(cfg.to_dict())
    torch.manual_seed(4)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(tmp_path / "theirs")
    loaded = load_saelens(tmp_path / "theirs")
    assert loaded.hook_name == "blocks.1.hook_resid_post"
    assert loaded.model_name == "someone-else"
    x = torch.randn(30, 20)
    assert torch.allclose(loaded.sae.encode(x), theirs.encode(x), atol=1e-5)


def test_sae_lens_folder_without_b_dec_centring_keeps_its_encoding(tmp_path):
    sae = _random_sae(seed=5)
    folder = save_saelens(sae, tmp_path / "f", "blocks.0.hook_mlp_out", "m")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = False
    (folder / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(10, 24)
    with torch.no_grad():
        top = (x @ sae.W_enc + sae.b_enc).topk(6, dim=-1)
        expected = torch.zeros(10, 96).scatter(-1, top.indices, top.values.relu())
        assert torch.allclose(load_saelens(folder).sae.encode(x), expected, atol=1e-5)


def test_bad_checkpoints_are_refused_with_a_message_naming_the_file(tmp_path):
    folder = save_saelens(_random_sae(), tmp_path / "ok", "blocks.0.hook_mlp_out", "model-a")
    with pytest.raises(CheckpointError, match="not match the model's 32"):
        load_saelens(folder, expect_d_in=32)
    with pytest.raises(CheckpointError, match="trained for 'model-a'"):
        load_saelens(folder, expect_model="model-b")
    weights = folder / "sae_weights.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="sae_weights.safetensors"):
        load_saelens(folder)
    save_file({"W_enc": torch.zeros(24, 90), "W_dec": torch.zeros(96, 24), "b_enc": torch.zeros(96), "b_dec": torch.zeros(24)}, weights)
    with pytest.raises(CheckpointError, match="W_enc has shape"):
        load_saelens(folder)
    with pytest.raises(CheckpointError, match="missing"):
        load_saelens(tmp_path / "nowhere")


def test_safe_sail_layout_encodes_like_the_release_formula(tmp_path):
    torch.manual_seed(6)
    C, d_sae, d_in, k = 2, 64, 16, 5
    state = {
        "pre_encoder_bias._bias_reference": torch.randn(C, d_in),
        "post_decoder_bias._bias_reference": torch.randn(C, d_in),
        "encoder.weight": torch.randn(C, d_sae, d_in),
        "encoder.bias": torch.randn(C, d_sae),
        "decoder.weight": torch.randn(C, d_in, d_sae),
    }
    path = tmp_path / "ckpt_layer8.pt"
    torch.save(state, path)
    loaded = load_safe_sail(path, layer=8, k=k)
    assert loaded.hook_name == "blocks.8.hook_mlp_out"
    x = torch.randn(12, d_in)
    pre = (x - state["pre_encoder_bias._bias_reference"][0]) @ state["encoder.weight"][0].T + state["encoder.bias"][0]
    top = pre.topk(k, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert torch.allclose(loaded.sae.encode(x), expected, atol=1e-4)
    recon = expected @ state["decoder.weight"][0].T + state["post_decoder_bias._bias_reference"][0]
    assert torch.allclose(loaded.sae.forward_dense(x), recon, atol=1e-3)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ckpt_layer8.pt"):
        load_safe_sail(path, layer=8)
