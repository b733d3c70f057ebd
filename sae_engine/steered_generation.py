"""Batched greedy answers under a steering edit, and whether an answer is fluent.

What the flip search, the capability cost and the flip benchmark share: many prompts answered at once
(left-padded, the chat template's user turn under the default system prompt), each edit applied as in the
app (`steering_edits`), and one judge of fluency, so that broken text ("$+$+$+...", "oh, oh, oh") never
counts as an answer.

Fluent = the answer's mean negative log-likelihood under the *unsteered* model is at most `max_nll` nats per
token, and it does not loop: at least `min_distinct` of its tokens are distinct, and no token repeats more
than `max_run` times in a row. The unsteered model's own greedy answers sit around 0.5-1.5 nats per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from sae_engine.chat import encode_user_turn
from sae_engine.hooks import edit
from sae_engine.inference import Intervention, PositionClock, SAEBundle, steering_edits
from sae_engine.models import LoadedModel
from sae_engine.refusal import label


@dataclass(frozen=True)
class Fluency:
    max_nll: float = 4.0
    min_distinct: float = 0.5
    max_run: int = 3


@dataclass
class Answer:
    text: str
    ids: list[int]
    nll: float | None  # mean over the answer's tokens, under the unsteered model (None: not judged)
    refused: bool
    fluent: bool | None  # None: not judged (see `judge` of `steered_answers`)


@dataclass
class Batch:
    """Prompts (token ids) to answer together: the longest prefix they share, run once, and each one's rest,
    left-padded after it ([prefix][pad...][rest]) so that every row's next token comes at the same column."""

    prefix: list[int]
    ids: Tensor  # (B, W) the rests, left-padded
    mask: Tensor  # (B, P + W) attention over prefix, pads and rest

    @classmethod
    def of(cls, rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> Batch:
        shortest = min(len(r) for r in rows)
        shared = 0
        while shared < shortest - 1 and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
        prefix = list(rows[0][:shared])
        rests = [list(r[shared:]) for r in rows]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
        return cls(prefix, ids, mask)

    @property
    def prompt_length(self) -> int:
        return len(self.prefix) + self.ids.shape[1]

    def full(self) -> tuple[Tensor, Tensor]:
        """(ids, mask) of whole prompts, prefix included."""
        prefix = torch.tensor([self.prefix], device=self.ids.device).expand(len(self.ids), -1)
        return torch.cat([prefix, self.ids], 1), self.mask


def user_turns(loaded: LoadedModel, prompts: Sequence[str]) -> Batch:
    rows = [encode_user_turn(loaded.tokenizer, p).ids for p in prompts]
    return Batch.of(rows, loaded.tokenizer.pad_token_id, loaded.device)


@torch.inference_mode()
def greedy(loaded: LoadedModel, batch: Batch, n_tokens: int, clock: PositionClock) -> tuple[Tensor, Tensor]:
    """(B, n_tokens) greedy continuations and the (B, vocab) logits of the first; `clock` tells the edits where the
    prompt ends. The shared prefix runs once for the whole batch (its key-value cache is copied to every row)."""
    model = loaded.model
    rows, width = batch.ids.shape
    shared = len(batch.prefix)
    clock.prompt_len, clock.offset = batch.prompt_length, 0
    cache = DynamicCache()
    if shared:
        model(input_ids=torch.tensor([batch.prefix], device=batch.ids.device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(rows)
    clock.offset = shared
    mask = batch.mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=batch.ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    first = out.logits[:, -1].float()
    tokens = []
    for step in range(n_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        if step == n_tokens - 1:
            break
        clock.offset = batch.prompt_length + step
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return torch.stack(tokens, dim=1), first


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


@torch.inference_mode()
def answer_nll(loaded: LoadedModel, ids: Tensor, mask: Tensor, answers: list[list[int]]) -> list[float]:
    """Mean NLL per token of each answer given its (left-padded) prompt, under the model as it is (no edits)."""
    width = max([1, *(len(a) for a in answers)])
    pad = loaded.tokenizer.pad_token_id
    tail = torch.tensor([a + [pad] * (width - len(a)) for a in answers], device=ids.device)
    tail_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers], device=ids.device)
    full, full_mask = torch.cat([ids, tail], 1), torch.cat([mask, tail_mask], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last width + 1 positions predict answer tokens: the LM head (the largest product) runs on those alone.
    logits = loaded.model(input_ids=full, attention_mask=full_mask, position_ids=positions, logits_to_keep=width + 1).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tail[..., None])[..., 0]
    counts = tail_mask.sum(1).clamp(min=1)
    return ((-logprobs * tail_mask).sum(1) / counts).tolist()


def fluent(ids: list[int], nll: float, rule: Fluency) -> bool:
    if not ids:
        return False
    runs, longest = 1, 1
    for a, b in zip(ids, ids[1:]):
        runs = runs + 1 if a == b else 1
        longest = max(longest, runs)
    return nll <= rule.max_nll and len(set(ids)) / len(ids) >= rule.min_distinct and longest <= rule.max_run


def steered_answers(
    loaded: LoadedModel,
    bundle: SAEBundle | None,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    directions: Mapping[int, Tensor] | None = None,
    n_tokens: int = 8,
    rule: Fluency = Fluency(),
    batch_size: int = 16,
    judge: Callable[[bool], bool] = lambda _refused: True,
) -> list[Answer]:
    """Greedy answers to `prompts` under the interventions (none: the model's own), judged for refusal and, where
    `judge(refused)` says so (fluency costs a forward pass), for fluency."""
    eos = loaded.eos_ids
    out: list[Answer] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = user_turns(loaded, chunk)
        clock = PositionClock()
        edits = steering_edits(bundle, interventions, clock, directions) if interventions else {}
        with edit(loaded.model, edits) if edits else nullcontext():
            generated = greedy(loaded, batch, n_tokens, clock)[0].tolist()
        ids, mask = batch.full()
        rows = [until_eos(row, eos) for row in generated]
        texts = [loaded.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        refused = [label(text).refused for text in texts]
        judged = [j for j, r in enumerate(refused) if judge(r)]
        nlls = dict(zip(judged, answer_nll(loaded, ids[judged], mask[judged], [rows[j] for j in judged]) if judged else []))
        for j, (row, text) in enumerate(zip(rows, texts)):
            nll = nlls.get(j)
            out.append(Answer(text, row, nll, refused[j], None if nll is None else fluent(row, nll, rule)))
    return out
