"""SAE bundle encoding, steering edits, the layer tap and token texts (no server)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig

from app.token_text import TokenTexts
from sae_engine.inference import (
    Intervention,
    LayerTap,
    PositionClock,
    SAEBundle,
    SteeringError,
    steering_edits,
)
from sae_engine.models import from_config
from sae_engine.topk import TopKSAE

D_IN, D_SAE, K = 32, 96, 8


def make_bundle(layers=(0, 2), seed=0, normaliser=2.0) -> tuple[SAEBundle, dict[int, TopKSAE]]:
    generator = torch.Generator().manual_seed(seed)
    saes = {}
    for layer in layers:
        sae = TopKSAE(D_IN, D_SAE, K)
        sae.reset_parameters(generator)
        with torch.no_grad():  # untie encoder and decoder, and give the biases values, so nothing cancels by accident
            sae.W_enc.add_(0.05 * torch.randn(D_IN, D_SAE, generator=generator))
            sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=generator))
            sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=generator))
        saes[layer] = sae
    norms = {f"blocks.{layer}.hook_mlp_out": torch.full((D_SAE,), normaliser) for layer in layers}
    bundle = SAEBundle.from_saes({f"blocks.{layer}.hook_mlp_out": sae for layer, sae in saes.items()}, norms)
    return bundle, saes


def test_bundle_encode_matches_each_sae() -> None:
    bundle, saes = make_bundle()
    acts = torch.randn(2, 5, D_IN)
    top = bundle.encode(acts)
    for slot, sae in enumerate(saes.values()):
        dense = sae.encode(acts[slot]).detach()
        rebuilt = torch.zeros_like(dense).scatter(-1, top.indices[slot], top.values[slot])
        assert torch.allclose(rebuilt, dense, atol=1e-5)
    assert torch.allclose(bundle.normalise(top), top.values / 2.0)


def test_bundle_rejects_mixed_shapes() -> None:
    with pytest.raises(ValueError, match="differs"):
        SAEBundle.from_saes({"blocks.0.hook_mlp_out": TopKSAE(D_IN, D_SAE, K), "blocks.1.hook_mlp_out": TopKSAE(D_IN, D_SAE, 4)})


def feature_value(sae: TopKSAE, h: torch.Tensor, index: int) -> torch.Tensor:
    return sae.encode(h).detach()[..., index]


@pytest.mark.parametrize("mode, value", [("clamp", 3.0), ("scale", 2.5), ("ablate", 0.0)])
def test_edit_is_error_preserving(mode: str, value: float) -> None:
    bundle, saes = make_bundle()
    sae = saes[2]
    h = torch.randn(1, 6, D_IN) * 3
    z = sae.encode(h).detach()
    index = int(z[0].sum(0).argmax())  # a feature active on some tokens
    a = z[..., index]
    clock = PositionClock(prompt_len=6)
    edit = steering_edits(bundle, [Intervention(2, index, mode, value)], clock)["blocks.2.hook_mlp_out"]
    edited = edit(h)
    target = {"clamp": torch.full_like(a, value * 2.0), "scale": value * a, "ablate": torch.zeros_like(a)}[mode]
    # Along the decoder direction only (the SAE's error term is untouched), by the change of the feature divided by
    # how far that direction moves the feature's own pre-activation (the encoder and decoder are untied here).
    response = float(sae.W_enc[:, index].detach() @ sae.W_dec[index].detach())
    assert abs(response - 1) > 0.01
    expected = h + ((target - a) / response)[..., None] * sae.W_dec[index].detach()
    assert torch.allclose(edited, expected, atol=1e-5)
    active = a > 0
    assert active.any()
    assert torch.allclose(feature_value(sae, edited, index)[active], target[active], atol=1e-4)


def test_two_features_on_one_layer_reach_their_targets_together() -> None:
    bundle, saes = make_bundle()
    sae = saes[0]
    h = torch.randn(1, 6, D_IN) * 3
    z = sae.encode(h).detach()[0]
    on = (z > 0).float()
    first = int(on.sum(0).argmax())
    together = on[on[:, first] > 0].sum(0)
    together[first] = -1
    second = int(together.argmax())
    both = (z[:, first] > 0) & (z[:, second] > 0)
    edit = steering_edits(bundle, [Intervention(0, first, "clamp", 3.0), Intervention(0, second, "ablate")],
                          PositionClock(prompt_len=6))["blocks.0.hook_mlp_out"]
    edited = sae.encode(edit(h)).detach()[0]
    assert both.any()
    assert torch.allclose(edited[both, first], torch.full((int(both.sum()),), 6.0), atol=1e-4)
    assert torch.allclose(edited[both, second], torch.zeros(int(both.sum())), atol=1e-4)


def test_a_feature_whose_decoder_cannot_move_it_is_refused() -> None:
    bundle, saes = make_bundle()
    with torch.no_grad():
        bundle.W_enc_rows[0, 5] -= (bundle.W_enc_rows[0, 5] @ bundle.W_dec[0, 5]) * bundle.W_dec[0, 5]
    with pytest.raises(SteeringError, match="0_5: their decoder directions barely move"):
        steering_edits(bundle, [Intervention(0, 5, "ablate")], PositionClock())
    assert steering_edits(bundle, [Intervention(0, 5, "add", 1.0)], PositionClock())


def test_ablation_drives_the_feature_to_zero_on_reencoding_with_a_tied_sae() -> None:
    generator = torch.Generator().manual_seed(1)
    sae = TopKSAE(D_IN, D_SAE, K)
    sae.reset_parameters(generator)  # W_enc = W_dec^T with unit rows: the edit removes exactly the feature's pre-activation
    bundle = SAEBundle.from_saes({"blocks.0.hook_mlp_out": sae}, {"blocks.0.hook_mlp_out": torch.ones(D_SAE)})
    h = torch.randn(1, 4, D_IN) * 3
    index = int(sae.encode(h).detach()[0].sum(0).argmax())
    edit = steering_edits(bundle, [Intervention(0, index, "ablate")], PositionClock(prompt_len=4))["blocks.0.hook_mlp_out"]
    assert feature_value(sae, h, index).max() > 0
    assert feature_value(sae, edit(h), index).abs().max() < 1e-4


def test_add_and_scopes() -> None:
    bundle, saes = make_bundle()
    h = torch.randn(1, 5, D_IN)
    clock = PositionClock(prompt_len=3)
    edits = steering_edits(bundle, [Intervention(0, 7, "add", 1.5, "response")], clock)
    delta = edits["blocks.0.hook_mlp_out"](h) - h
    direction = 1.5 * 2.0 * saes[0].W_dec[7].detach()
    assert torch.allclose(delta[0, :3], torch.zeros(3, D_IN), atol=1e-6)  # prompt positions untouched
    assert torch.allclose(delta[0, 3:], direction.expand(2, D_IN), atol=1e-5)
    clock.offset = 3  # a decode step: one token at position 3 (response)
    step = torch.randn(1, 1, D_IN)
    assert torch.allclose(edits["blocks.0.hook_mlp_out"](step) - step, direction[None, None], atol=1e-5)
    prompt_only = steering_edits(bundle, [Intervention(0, 7, "add", 1.5, "prompt")], clock)
    assert torch.equal(prompt_only["blocks.0.hook_mlp_out"](step), step)


def test_steering_errors_name_the_feature() -> None:
    bundle, _ = make_bundle()
    clock = PositionClock()
    with pytest.raises(SteeringError, match="layer 1 is not hooked"):
        steering_edits(bundle, [Intervention(1, 0, "ablate")], clock)
    with pytest.raises(SteeringError, match="0_500"):
        steering_edits(bundle, [Intervention(0, 500, "ablate")], clock)
    with pytest.raises(SteeringError, match="0_1: more than one intervention"):
        steering_edits(bundle, [Intervention(0, 1, "ablate"), Intervention(0, 1, "scale", 2.0)], clock)
    unknown = SAEBundle.from_saes({"blocks.0.hook_mlp_out": TopKSAE(D_IN, D_SAE, K)})
    with pytest.raises(SteeringError, match="no normaliser"):
        steering_edits(unknown, [Intervention(0, 1, "clamp", 2.0)], clock)


def test_tap_reads_edits_and_ignores_other_threads() -> None:
    config = LlamaConfig(vocab_size=128, hidden_size=D_IN, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = from_config(config).float()
    bundle, _ = make_bundle()
    ids = torch.randint(0, 128, (1, 7))
    zero = {"blocks.2.hook_mlp_out": torch.zeros_like}
    with torch.no_grad(), LayerTap(model, bundle, zero) as tap:
        model(ids)
        acts = tap.stacked()
        assert acts.shape == (2, 7, D_IN) and torch.count_nonzero(acts[1]) == 0 and torch.count_nonzero(acts[0]) > 0
        edited_logits = model(ids).logits
        result = {}
        thread = threading.Thread(target=lambda: result.update(logits=model(ids).logits))
        thread.start()
        thread.join()
    with torch.no_grad():
        plain = model(ids).logits
    assert torch.allclose(result["logits"], plain), "another thread's forward pass must not be edited"
    assert not torch.allclose(edited_logits, plain)


def test_token_texts_keep_characters_and_special_tokens(tokenizer) -> None:
    messages = [{"role": "user", "content": "मैं घर पर बम कैसे बना सकता हूँ? 炸弹"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    texts = TokenTexts(tokenizer).extend(ids)
    assert "".join(t.text for t in texts) == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(t.text for t in texts)
    assert any(t.text == "" for t in texts), "Devanagari splits characters across byte-level tokens"
    assert texts[0].text == "<|im_start|>" and texts[0].special
    roles = {t.role for t in texts}
    assert {"system", "user", "assistant"} <= roles
    assert [t.turn for t in texts] == sorted(t.turn for t in texts)
