"""The model runs behind the pages, each executed as one job in the worker thread.

- `chat_job`: stream the prompt's overlay, then each generated token with its overlay (SSE).
- `steer_job`: the default and the steered answer with the same seed, each with its overlay.
- `trace_job` / `compare_job`: the layers x tokens grid of one prompt, and two prompts' differences.

The stream format of `/api/chat` is `STREAM_FORMAT` (shown in the endpoint's OpenAPI description).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.generation import Job, Sampling, generate
from app.overlay import FeatureMasks, Overlay, TokenFeatures, domain_summary
from app.queries import FeatureMeta
from app.state import SetRuntime
from app.token_text import TokenText, TokenTexts
from sae_engine.chat import EncodedChat, encode_chat
from sae_engine.hooks import capture
from sae_engine.inference import (
    DIRECTION_MODES,
    Condition,
    Intervention,
    LayerTap,
    PositionClock,
    SAEBundle,
    steering_edits,
)
from sae_engine.models import LoadedModel
from sae_engine.refusal import REFUSAL_TAG, first_token_ids, refusal_probability

STREAM_FORMAT = """\
Events, each with one JSON object as data, in this order:

```
event: queued    {"position": n}                          only when the job waits behind n others
event: features  {"<id>": Feature, ...}                   metadata of features seen for the first time
event: prompt    {"tokens": [Token, ...], "turns": [Turn], "risk": Risk | null}  every prompt token: system, user, earlier turns
event: token     Token                                     one generated token, as soon as it exists
event: done      {"finish_reason": "eos"|"length"|"feature", "n_tokens", "ms_per_token", "text", "turns": [Turn],
                  "stopped_at": token position | null}``  (`feature`: `stop_when` fired on that token)
event: error     {"detail"}                                the generation failed
```

- Token = `{"i": position, "id": token id, "text", "special": bool, "role", "turn", "content": bool, "tint":
  strongest normalised activation of a counted feature, "top": [["<layer>_<index>", normalised activation], ...]}`
  (strongest first; a feature counts when it is explained or safety-tagged and has a normaliser). `content`
  is true for the words of a user or assistant turn; template and system-prompt tokens are shown with their
  features but never counted: their tint is 0 and turn summaries leave them out.
- Feature = `{"id", "layer", "index", "explanation", "explainer", "score", "score_method", "domains", "is_safety"}`.
- Turn = `{"turn", "role", "n_tokens", "domains": {"<domain>": strongest normalised activation on content tokens}}`.
- Risk = the set's monitors on the last user turn: `{"turn", "probe": {"<domain>": {"p", "logit", "layer",
  "representation", "reasons": [{"id", "contribution", "activation"}, ...]}}, "ksparse": {"<domain>": p}}`
  (null when the set has no monitors): the dense probe's calibrated risk per domain, with the SAE features
  that add most to its logit.

Closing the connection cancels the generation.
"""

# Tokens encoded together in one batched SAE pass over a long prompt (bounds the (L, T, d_sae) matrix).
ENCODE_BUDGET = 1 << 24


def encode_prompt(model: LoadedModel, messages: list[dict[str, str]], chat_template: bool = True,
                  answer: str | None = None) -> EncodedChat:
    """The prompt's tokens (and the answer's, if given) with the content mask, exactly as the pipeline encodes its
    queries (`sae_engine.chat`)."""
    return encode_chat(model.tokenizer, messages, answer, chat_template=chat_template)


def overlay_tokens(overlay: Overlay, acts: torch.Tensor) -> list[TokenFeatures]:
    n_layers, n_tokens, _ = acts.shape
    chunk = max(1, ENCODE_BUDGET // (n_layers * overlay.bundle.d_sae))
    out: list[TokenFeatures] = []
    for start in range(0, n_tokens, chunk):
        out.extend(overlay.tokens(acts[:, start:start + chunk]))
    return out


def token_payload(i: int, text: TokenText, features: TokenFeatures, content: bool) -> dict[str, Any]:
    payload = {"i": i, **text.payload(), "content": content, **features.payload()}
    if not content:
        payload["tint"] = 0.0
    return payload


class FeatureAnnouncer:
    """Collects the metadata of features the client has not seen yet."""

    def __init__(self, catalog: dict[str, FeatureMeta]) -> None:
        self.catalog = catalog
        self.sent: set[str] = set()

    def new(self, tokens: list[TokenFeatures]) -> dict[str, dict]:
        fresh = {}
        for token in tokens:
            for fid, _ in token.top:
                if fid not in self.sent:
                    self.sent.add(fid)
                    if fid in self.catalog:
                        fresh[fid] = self.catalog[fid].public()
        return fresh


def turn_summaries(
    texts: list[TokenText], feats: list[TokenFeatures], content: list[bool], catalog: dict[str, FeatureMeta]
) -> list[dict]:
    """Per turn, its content tokens and the strongest activation per domain on them."""
    by_turn: dict[int, list[TokenFeatures]] = defaultdict(list)
    roles: dict[int, str] = {}
    for text, features, counted in zip(texts, feats, content):
        roles[text.turn] = text.role
        by_turn.setdefault(text.turn, [])
        if counted:
            by_turn[text.turn].append(features)
    return [
        {"turn": turn, "role": roles[turn], "n_tokens": len(items), "domains": domain_summary(items, catalog)}
        for turn, items in sorted(by_turn.items())
    ]


def last_turn_risk(runtime: SetRuntime, acts: torch.Tensor, texts: list[TokenText], content: list[bool]) -> dict | None:
    """The monitors' risks for the prompt's last user turn (its content tokens), or None without monitors."""
    if not runtime.monitors:
        return None
    user_turns = [t.turn for t in texts if t.role == "user"]
    if not user_turns:
        return None
    last = max(user_turns)
    mask = [c and t.role == "user" and t.turn == last for t, c in zip(texts, content)]
    return {"turn": last, **runtime.monitors.assess(acts, torch.tensor(mask, dtype=torch.bool, device=acts.device))}


class FeatureStop:
    """`stop_when`: true on the first generated token where a feature's normalised activation exceeds a value."""

    def __init__(self, bundle: SAEBundle, condition: Condition | None) -> None:
        self.bundle, self.condition = bundle, condition
        if condition is not None:
            self.slot = bundle.slot(condition.layer)
            self.index = torch.tensor([condition.index], device=bundle.device)

    def fires(self, acts: torch.Tensor) -> bool:
        """acts: (L, 1, d_in) of the token just fed."""
        if self.condition is None:
            return False
        top = self.bundle.encode_layer(self.slot, acts[self.slot, -1:])
        value = self.bundle.feature_activations(top, self.index)[0, 0] / self.bundle.normalisers[self.slot, self.condition.index]
        return bool(value > self.condition.above)


@dataclass(frozen=True)
class SteeringPlan:
    """Checked feature edits and a stop condition, for a token loop of its own (the `/v1` endpoint's)."""

    bundle: SAEBundle
    interventions: tuple[Intervention, ...]
    directions: Mapping[int, torch.Tensor]
    stop_when: Condition | None = None

    def passes(self, model: nn.Module, prompt_len: int) -> SteeredPasses:
        return SteeredPasses(self, model, prompt_len)


class SteeredPasses:
    """The plan's hooks on the model for one generation: `at(position)` before each pass, `stopped()` after it."""

    def __init__(self, plan: SteeringPlan, model: nn.Module, prompt_len: int) -> None:
        self.clock = PositionClock(prompt_len, 0)
        edits = steering_edits(plan.bundle, plan.interventions, self.clock, plan.directions) if plan.interventions else {}
        self.tap = LayerTap(model, plan.bundle, edits)
        self.stop = FeatureStop(plan.bundle, plan.stop_when)

    def __enter__(self) -> SteeredPasses:  # noqa: PYI034
        self.tap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tap.__exit__(*exc)

    def at(self, position: int) -> None:
        self.clock.offset = position

    def stopped(self) -> bool:
        return self.stop.condition is not None and self.stop.fires(self.tap.stacked())


def chat_job(model: LoadedModel, runtime: SetRuntime, prompt: EncodedChat, sampling: Sampling,
             domains: list[str] | None, top_n: int, stop_when: Condition | None = None) -> Callable[[Job], dict]:
    assert runtime.bundle is not None and runtime.masks is not None
    overlay = Overlay(runtime.bundle, runtime.masks.restricted(domains), top_n)
    stops = model.eos_ids
    stopper = FeatureStop(runtime.bundle, stop_when)

    def work(job: Job) -> dict:
        texts = TokenTexts(model.tokenizer)
        announcer = FeatureAnnouncer(runtime.catalog)
        all_texts: list[TokenText] = []
        all_feats: list[TokenFeatures] = []
        all_content: list[bool] = []
        generated: list[int] = []
        finish, stopped_at = "length", None
        with LayerTap(model.model, runtime.bundle) as tap:
            steps = generate(model.model, tap, PositionClock(), prompt.ids, sampling, stops, job.check)
            first = next(steps)
            prompt_texts = texts.extend(prompt.ids)
            prompt_feats = overlay_tokens(overlay, first.acts)
            fresh = announcer.new(prompt_feats)
            if fresh:
                job.emit("features", fresh)
            job.emit("prompt", {
                "tokens": [token_payload(i, t, f, c) for i, (t, f, c) in enumerate(zip(prompt_texts, prompt_feats, prompt.content))],
                "turns": turn_summaries(prompt_texts, prompt_feats, prompt.content, runtime.catalog),
                "risk": last_turn_risk(runtime, first.acts, prompt_texts, prompt.content),
            })
            all_texts += prompt_texts
            all_feats += prompt_feats
            all_content += prompt.content
            started = time.perf_counter()
            for step in steps:
                text = texts.push(step.token_id)
                features = overlay.tokens(step.acts)[0]
                job.tokens += 1
                generated.append(step.token_id)
                fresh = announcer.new([features])
                if fresh:
                    job.emit("features", fresh)
                job.emit("token", token_payload(len(all_texts), text, features, not text.special))
                all_texts.append(text)
                all_feats.append(features)
                all_content.append(not text.special)
                if step.token_id in stops:
                    finish = "eos"
                elif stopper.fires(step.acts):
                    finish, stopped_at = "feature", len(all_texts) - 1
                    break
            elapsed = time.perf_counter() - started
        done = {
            "finish_reason": finish,
            "n_tokens": len(generated),
            "ms_per_token": round(1000 * elapsed / max(1, len(generated)), 3),
            "text": model.tokenizer.decode(generated, skip_special_tokens=True),
            "turns": turn_summaries(all_texts, all_feats, all_content, runtime.catalog),
            "stopped_at": stopped_at,
        }
        job.emit("done", done)
        return done

    return work


def _run(model: LoadedModel, runtime: SetRuntime, overlay: Overlay, prompt: EncodedChat, sampling: Sampling,
         interventions: list[Intervention], track: list[tuple[int, int]], job: Job, stopper: FeatureStop) -> dict:
    bundle = runtime.bundle
    assert bundle is not None
    clock = PositionClock()
    edits = steering_edits(bundle, interventions, clock, runtime.directions) if interventions else {}
    texts = TokenTexts(model.tokenizer)
    stops = model.eos_ids
    prompt_out: list[dict] = []
    response_out: list[dict] = []
    tracked: list[torch.Tensor] = []
    generated: list[int] = []
    finish, stopped_at = "length", None
    with LayerTap(model.model, bundle, edits) as tap:
        for step in generate(model.model, tap, clock, prompt.ids, sampling, stops, job.check):
            if step.token_id is None:
                token_texts = texts.extend(prompt.ids)
                content = prompt.content
                target = prompt_out
            else:
                token_texts = [texts.push(step.token_id)]
                content = [not token_texts[0].special]
                target = response_out
                generated.append(step.token_id)
                job.tokens += 1
                if step.token_id in stops:
                    finish = "eos"
            feats = overlay_tokens(overlay, step.acts)
            offset = len(prompt_out) + len(response_out)
            target.extend(token_payload(offset + j, t, f, c) for j, (t, f, c) in enumerate(zip(token_texts, feats, content)))
            tracked.append(overlay.tracked(step.acts, track))
            if step.token_id is not None and step.token_id not in stops and stopper.fires(step.acts):
                finish, stopped_at = "feature", offset
                break
    columns = torch.cat(tracked).T.tolist() if track else []
    return {
        "text": model.tokenizer.decode(generated, skip_special_tokens=True),
        "finish_reason": finish,
        "stopped_at": stopped_at,
        "prompt": prompt_out,
        "response": response_out,
        "tracked": {f"{layer}_{index}": [round(v, 4) for v in column] for (layer, index), column in zip(track, columns)},
        "tracked_units": {f"{layer}_{index}": "normalised" if overlay.has_normaliser(layer, index) else "raw"
                          for layer, index in track},
    }


def steer_job(model: LoadedModel, runtime: SetRuntime, prompt: EncodedChat, sampling: Sampling,
              interventions: list[Intervention], top_n: int, stop_when: Condition | None = None,
              with_cost: bool = True) -> Callable[[Job], dict]:
    assert runtime.bundle is not None and runtime.masks is not None
    overlay = Overlay(runtime.bundle, runtime.masks.counted, top_n)
    # Both runs track the steered features, so they compare feature by feature.
    track = [(i.layer, i.index) for i in interventions if i.mode not in DIRECTION_MODES]
    stopper = FeatureStop(runtime.bundle, stop_when)

    def work(job: Job) -> dict:
        default = _run(model, runtime, overlay, prompt, sampling, [], track, job, stopper)
        steered = _run(model, runtime, overlay, prompt, sampling, interventions, track, job, stopper)
        job.check()
        cost = runtime.steering_cost(model, interventions) if with_cost else None
        return {"default": default, "steered": steered, "cost": cost}

    return work


def _acts_and_refusal(model: LoadedModel, runtime: SetRuntime, prompt: EncodedChat) -> tuple[torch.Tensor, float]:
    """Hooked activations (L, T, d) of a prompt (and its answer, if it has one), and the model's probability that
    its answer opens with a refusal, read at the prompt's last token."""
    bundle = runtime.bundle
    assert bundle is not None
    last = torch.tensor([prompt.last_prompt_token], device=model.device)
    with capture(model.model, bundle.hook_names, stop_early=False) as store, torch.inference_mode():
        out = model.model(input_ids=torch.tensor([prompt.ids], device=model.device), use_cache=False, logits_to_keep=last)
    probability = refusal_probability(out.logits[:, -1], first_token_ids(model.tokenizer))
    return torch.stack([store[name][0] for name in bundle.hook_names]), round(float(probability[0]), 4)


def _chain_features(overlay: Overlay, acts: torch.Tensor, chosen: list[tuple[int, int]], content: torch.Tensor) -> list[dict]:
    """Each chosen feature's activations over all tokens, its maximum and peak over the content tokens."""
    if not chosen:
        return []
    rows = overlay.tracked(acts, chosen).T
    counted = torch.where(content, rows, torch.full_like(rows, -1.0))
    out = []
    for (layer, index), row, peak in zip(chosen, rows.tolist(), counted.argmax(dim=1).tolist()):
        out.append({"id": f"{layer}_{index}", "max": round(row[peak], 4), "peak_token": peak, "activations": [round(v, 4) for v in row]})
    return out


def trace(model: LoadedModel, runtime: SetRuntime, prompt: EncodedChat, only_safety: bool, top_n: int) -> tuple[dict, torch.Tensor]:
    """The layers x tokens grid, the per-layer chain ending in refusal, the per-domain scores of one prompt,
    and each feature's maxima (L, d_sae); everything counted over content tokens only."""
    bundle, masks = runtime.bundle, runtime.masks
    assert bundle is not None and masks is not None
    overlay = Overlay(bundle, masks.safety if only_safety else masks.counted)
    acts, p_refusal = _acts_and_refusal(model, runtime, prompt)
    content = torch.tensor(prompt.content, dtype=torch.bool, device=acts.device)
    best, where = overlay.grid(acts)
    best = best * content
    maxima = overlay.layer_maxima(acts[:, content])
    layers = bundle.layers
    grid_features = [
        [f"{layer}_{index}" if value > 0 else None for value, index in zip(values, indices)]
        for layer, values, indices in zip(layers, best.tolist(), where.tolist())
    ]
    chain = []
    for slot, layer in enumerate(layers):
        values, indices = maxima[slot].topk(min(top_n, bundle.d_sae))
        chosen = [(layer, i) for v, i in zip(values.tolist(), indices.tolist()) if v > 0]
        chain.append({"layer": layer, "features": _chain_features(overlay, acts, chosen, content)})
    refusal_mask = masks.by_domain.get(REFUSAL_TAG)
    refusal_features: list[dict] = []
    if refusal_mask is not None:
        scores = (maxima * refusal_mask.to(maxima.device)).flatten()
        n = min(top_n, int((scores > 0).sum()))
        chosen = [(layers[i // bundle.d_sae], i % bundle.d_sae) for i in scores.topk(n).indices.tolist()] if n else []
        refusal_features = _chain_features(overlay, acts, chosen, content)
    tokens = [{**t.payload(), "content": c} for t, c in zip(TokenTexts(model.tokenizer).extend(prompt.ids), prompt.content)]
    referenced = (
        {fid for row in grid_features for fid in row if fid}
        | {f["id"] for c in chain for f in c["features"]}
        | {f["id"] for f in refusal_features}
    )
    result = {
        "sae_set": runtime.info.id,
        "tokens": tokens,
        "layers": list(layers),
        "grid": [[round(v, 4) for v in row] for row in best.tolist()],
        "grid_features": grid_features,
        "chain": chain,
        "refusal": {"probability": p_refusal, "features": refusal_features},
        "domains": domain_maxima(maxima, masks),
        "monitor": runtime.monitors.assess(acts, content) if runtime.monitors else None,
        "features": {fid: runtime.catalog[fid].public() for fid in sorted(referenced) if fid in runtime.catalog},
    }
    return result, maxima


def domain_maxima(maxima: torch.Tensor, masks: FeatureMasks) -> dict[str, float]:
    """Per tagged domain, the strongest normalised activation of its features (maxima: (L, d_sae))."""
    return {
        domain: round(float((maxima * mask.to(maxima.device)).max()), 4) for domain, mask in sorted(masks.by_domain.items())
    }


def trace_job(model: LoadedModel, runtime: SetRuntime, prompt: EncodedChat, only_safety: bool, top_n: int) -> Callable[[Job], dict]:
    def work(job: Job) -> dict:
        job.check()
        return trace(model, runtime, prompt, only_safety, top_n)[0]

    return work


def compare_job(model: LoadedModel, runtime: SetRuntime, ids_a: EncodedChat, ids_b: EncodedChat, only_safety: bool,
                top_n: int, n_differences: int) -> Callable[[Job], dict]:
    def work(job: Job) -> dict:
        job.check()
        a, max_a = trace(model, runtime, ids_a, only_safety, top_n)
        job.check()
        b, max_b = trace(model, runtime, ids_b, only_safety, top_n)
        diff = max_a - max_b
        active = (max_a > 0) | (max_b > 0)
        magnitude = torch.where(active, diff.abs(), torch.full_like(diff, -1.0)).flatten()
        n = min(n_differences, int(active.sum()))
        order = magnitude.topk(n).indices.tolist() if n else []
        layers = runtime.bundle.layers
        d_sae = runtime.bundle.d_sae
        differences = []
        for flat in order:
            slot, index = divmod(flat, d_sae)
            differences.append({
                "id": f"{layers[slot]}_{index}",
                "a": round(float(max_a[slot, index]), 4),
                "b": round(float(max_b[slot, index]), 4),
                "difference": round(float(diff[slot, index]), 4),
            })
        features = {**a["features"], **b["features"]}
        for item in differences:
            if item["id"] in runtime.catalog:
                features[item["id"]] = runtime.catalog[item["id"]].public()
        return {"a": a, "b": b, "differences": differences, "features": features}

    return work
