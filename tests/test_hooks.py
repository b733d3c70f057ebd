"""Hook points on the Llama, Qwen2, Mistral and Gemma-2 layouts."""

import pytest
import torch

from sae_engine.hooks import (
    HookPoint,
    HookPointError,
    capture,
    capture_activations,
    decoder_layers,
    edit,
)
from tests.tiny_models import CONFIGS, tiny_model

LAYOUTS = sorted(CONFIGS)


@pytest.fixture(params=LAYOUTS)
def model(request):
    return tiny_model(request.param)


def _ids(seed=0):
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_resid_post_equals_hidden_states(model):
    ids = _ids()
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    acts = capture_activations(model, ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"], ids)
    assert torch.allclose(acts["blocks.1.hook_resid_post"], hidden[2], atol=1e-5)
    assert torch.allclose(acts["blocks.2.hook_resid_post"], hidden[3], atol=1e-5)


def test_attn_and_mlp_outputs_add_up_to_the_residual_update(model):
    ids = _ids(1)
    points = ["blocks.1.hook_resid_post", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post"]
    acts = capture_activations(model, points, ids)
    rebuilt = acts["blocks.1.hook_resid_post"] + acts["blocks.2.hook_attn_out"] + acts["blocks.2.hook_mlp_out"]
    assert torch.allclose(rebuilt, acts["blocks.2.hook_resid_post"], atol=1e-4)


def test_capture_stops_after_the_deepest_point(model):
    calls = []
    layers = decoder_layers(model)
    handles = [layers[i].register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i in range(len(layers))]
    handles.append(model.get_output_embeddings().register_forward_pre_hook(lambda *_: calls.append("lm_head")))
    capture_activations(model, ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"], _ids())
    for h in handles:
        h.remove()
    assert calls == [0, 1]


def test_identity_edit_leaves_logits_unchanged_and_a_real_edit_changes_them(model):
    ids = _ids(2)
    clean = model(input_ids=ids).logits
    with edit(model, {"blocks.1.hook_mlp_out": lambda h: h, "blocks.2.hook_resid_post": lambda h: h.clone()}):
        same = model(input_ids=ids).logits
    with edit(model, {"blocks.1.hook_mlp_out": lambda h: h * 3}):
        changed = model(input_ids=ids).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, changed)
    assert torch.equal(model(input_ids=ids).logits, clean), "the edit hook must be removed on exit"


def test_capture_without_stop_collects_generation_steps(model):
    ids = _ids(3)[:1]
    with capture(model, ["blocks.3.hook_resid_post"], stop_early=False) as store:
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # The prompt pass plus one pass per generated token after the first.
    assert store["blocks.3.hook_resid_post"].shape[1] == ids.shape[1] + 2


def test_bad_hook_points_are_refused_with_a_clear_message(model):
    with pytest.raises(HookPointError, match="expected blocks"):
        HookPoint.parse("layers.3.mlp")
    with pytest.raises(HookPointError, match="has layers 0..3"):
        capture_activations(model, ["blocks.9.hook_mlp_out"], _ids())
