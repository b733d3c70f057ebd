"""What a steering edit costs the model: its next-token cross-entropy on benign texts, and how often it refuses
benign prompts, against the unsteered model on the same fixed set (`sae_engine/data/capability.json`).

The figures are small and quick by design (24 short texts, 16 prompts answered with a few tokens), so the app
can show them beside any steered answer within seconds, and cache them per edit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from sae_engine.hooks import edit
from sae_engine.inference import Intervention, PositionClock, SAEBundle, steering_edits
from sae_engine.models import LoadedModel
from sae_engine.steered_generation import steered_answers

DATA = Path(__file__).parent / "data" / "capability.json"
REFUSAL_TOKENS = 8


@dataclass(frozen=True)
class Cost:
    ce: float  # mean next-token cross-entropy on the texts under the edit (nats)
    ce_increase: float  # ce - the unsteered model's
    benign_refusal: float  # share of the benign prompts refused under the edit
    baseline_refusal: float  # the unsteered model's share

    def as_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@cache
def capability_set() -> tuple[tuple[str, ...], tuple[str, ...]]:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    return tuple(data["texts"]), tuple(data["prompts"])


@torch.inference_mode()
def text_cross_entropy(loaded: LoadedModel, texts: Sequence[str], edits: Mapping[str, object] | None = None) -> float:
    """Mean next-token cross-entropy over the texts' tokens (the model's BOS/EOS opener first)."""
    tokenizer = loaded.tokenizer
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = [[opener, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=loaded.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=loaded.device)
    with edit(loaded.model, edits) if edits else nullcontext():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    weights = mask[:, 1:].float()
    return float((nll * weights).sum() / weights.sum())


def steering_cost(
    loaded: LoadedModel,
    bundle: SAEBundle,
    interventions: Sequence[Intervention],
    directions: Mapping[int, Tensor] | None = None,
    baseline: tuple[float, float] | None = None,
) -> Cost:
    """The cost of `interventions`; `baseline` (ce, refusal rate) of the unsteered model when known."""
    texts, prompts = capability_set()
    if baseline is None:
        baseline = unsteered_baseline(loaded)
    clock = PositionClock(prompt_len=0)  # a text has no prompt: every position is "response" for scoped edits
    edits = steering_edits(bundle, interventions, clock, directions)
    ce = text_cross_entropy(loaded, texts, edits)
    answers = steered_answers(loaded, bundle, prompts, interventions, directions, n_tokens=REFUSAL_TOKENS, judge=_no_fluency)
    refusal = sum(a.refused for a in answers) / len(answers)
    return Cost(ce, ce - baseline[0], refusal, baseline[1])


def _no_fluency(_refused: bool) -> bool:
    return False  # the refusal rate needs only the openings


def unsteered_baseline(loaded: LoadedModel) -> tuple[float, float]:
    texts, prompts = capability_set()
    answers = steered_answers(loaded, None, prompts, n_tokens=REFUSAL_TOKENS, judge=_no_fluency)
    return text_cross_entropy(loaded, texts), sum(a.refused for a in answers) / len(answers)
