"""Refusal-direction steering, conditional interventions and `stop_when` at the engine level."""

from __future__ import annotations

import pytest
import torch

from app.live import FeatureStop
from sae_engine.inference import Condition, Intervention, PositionClock, SteeringError, steering_edits
from tests.test_app_inference import D_IN, make_bundle

HOOK0, HOOK2 = "blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"


def test_direction_ablate_projects_the_direction_out_and_add_moves_along_it() -> None:
    bundle, _ = make_bundle()
    direction = torch.randn(D_IN)
    h = torch.randn(2, 5, D_IN)
    clock = PositionClock(prompt_len=5)
    ablated = steering_edits(bundle, [Intervention(2, -1, "direction_ablate")], clock, {2: direction})[HOOK2](h)
    unit = direction / direction.norm()
    assert torch.allclose(ablated @ unit, torch.zeros(2, 5), atol=1e-4)
    assert torch.allclose(ablated - h, -(h @ unit)[..., None] * unit, atol=1e-5)
    added = steering_edits(bundle, [Intervention(2, -1, "direction_add", 1.5)], clock, {2: direction})[HOOK2](h)
    assert torch.allclose(added - h, 1.5 * direction.expand_as(h), atol=1e-5)
    with pytest.raises(SteeringError, match="layer 0 has no refusal direction"):
        steering_edits(bundle, [Intervention(0, -1, "direction_ablate")], clock, {2: direction})


def test_a_condition_gates_the_positions_an_intervention_acts_on() -> None:
    bundle, saes = make_bundle()
    h = torch.randn(1, 6, D_IN)
    top = bundle.encode_layer(0, h)
    activations = bundle.feature_activations(top, torch.arange(bundle.d_sae))[0] / 2.0  # normaliser 2.0
    index = int(((activations > 0).float().sum(0) == 3).nonzero()[0]) if ((activations > 0).sum(0) == 3).any() else int(
        (activations > 0).float().sum(0).argmax())
    fires = activations[:, index] > 0
    edit = Intervention(2, 7, "add", 1.0, "both", Condition(0, index, 0.0))
    edits = steering_edits(bundle, [edit], PositionClock(prompt_len=6))
    assert set(edits) == {HOOK0, HOOK2}  # the condition is read at layer 0, the edit applied at layer 2
    edits[HOOK0](h)  # layer 0 runs first in the forward pass and records where its feature fires
    h2 = torch.randn(1, 6, D_IN)
    delta = edits[HOOK2](h2) - h2
    moved = delta.abs().sum(-1)[0] > 1e-6
    assert torch.equal(moved, fires) and 0 < int(fires.sum()) < 6
    with pytest.raises(SteeringError, match="a condition must come from the same or an earlier hooked layer"):
        steering_edits(bundle, [Intervention(0, 7, "add", 1.0, "both", Condition(2, 1, 0.0))], PositionClock())


def test_stop_when_fires_on_the_token_where_the_feature_exceeds_the_value() -> None:
    bundle, _ = make_bundle()
    acts = torch.randn(2, 1, D_IN)
    top = bundle.encode_layer(0, acts[0])
    index = int(top.indices[0, top.values[0].argmax()])
    value = float(top.values[0].max()) / 2.0
    assert FeatureStop(bundle, Condition(0, index, value - 1e-3)).fires(acts)
    assert not FeatureStop(bundle, Condition(0, index, value + 1e-3)).fires(acts)
    assert not FeatureStop(bundle, None).fires(acts)
