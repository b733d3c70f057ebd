"""The smallest SAE-feature edits that flip the model's safety decision, found on the filter split.

- unlock: prompts the model refuses; a flip is a fluent answer that is not a refusal;
- induce: benign prompts the model answers; a flip is a refusal.

Candidates are the features whose normalised activation at the last prompt token (where the answer is decided)
differs most between refused and answered prompts, per hooked layer; each is tried alone with every mode and
value of `FlipConfig` (unlock pushes them down, induce up). Then a greedy forward selection adds the candidate
that most raises the number of flipped search prompts, up to `max_features`, while it still helps. A flip must be
fluent (`sae_engine.steered_generation.Fluency`): broken text never counts, and the search records how many
refusals it stopped only by breaking the text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import Tensor

from sae_engine.inference import Intervention, SAEBundle
from sae_engine.models import LoadedModel
from sae_engine.steered_generation import Answer, Fluency, steered_answers


@dataclass(frozen=True)
class FlipConfig:
    n_search: int = 10  # prompts each candidate is judged on
    answer_tokens: int = 6  # enough for a refusal's opening ("I'm sorry, but I") or an answer's
    per_layer: int = 2  # candidate features per hooked layer
    # Moves along the decoder directions, in normalised units; ablating one feature rarely flips a decision.
    unlock_edits: tuple[tuple[str, float], ...] = (("add", -15.0), ("add", -30.0))
    induce_edits: tuple[tuple[str, float], ...] = (("add", 15.0), ("add", 30.0))
    max_features: int = 3
    fluency: Fluency = field(default_factory=Fluency)


@dataclass
class Candidate:
    layer: int
    index: int
    separation: float  # mean normalised activation at the last prompt token, refused - answered


@dataclass
class Trial:
    interventions: list[dict]
    flipped: int
    broken: int  # decisions changed only into broken (non-fluent) text
    n: int

    @property
    def rate(self) -> float:
        return self.flipped / self.n if self.n else 0.0


@dataclass
class FlipResult:
    goal: str  # "unlock" or "induce"
    best: Trial | None
    trials: list[Trial]
    candidates: list[dict]

    def as_dict(self) -> dict:
        return {"goal": self.goal, "best": self.best and asdict(self.best), "trials": [asdict(t) for t in self.trials],
                "candidates": self.candidates}


def candidates(last_acts: Mapping[int, np.ndarray], refused: np.ndarray, per_layer: int) -> list[Candidate]:
    """Per layer, the features most active at the last prompt token of refused over answered prompts.

    last_acts[layer]: (prompts, d_sae) normalised activations at each prompt's last token.
    """
    out: list[Candidate] = []
    if refused.all() or not refused.any():  # no contrast to rank by
        return out
    for layer, acts in sorted(last_acts.items()):
        separation = acts[refused].mean(0) - acts[~refused].mean(0)
        for index in np.argsort(-separation)[:per_layer]:
            out.append(Candidate(layer, int(index), float(separation[index])))
    return out


def flips(goal: str, answers: Sequence[Answer]) -> tuple[int, int]:
    """(fluent flips, decisions changed only into broken text) of answers to prompts that started the other way."""
    if goal == "unlock":
        flipped = sum(1 for a in answers if not a.refused and a.fluent)
        broken = sum(1 for a in answers if not a.refused and not a.fluent)
    else:
        flipped = sum(1 for a in answers if a.refused and a.fluent)
        broken = sum(1 for a in answers if a.refused and not a.fluent)
    return flipped, broken


def as_intervention(item: dict) -> Intervention:
    return Intervention(item["layer"], item["index"], item["mode"], item["value"], item.get("scope", "both"))


def judge(
    loaded: LoadedModel,
    bundle: SAEBundle,
    goal: str,
    prompts: Sequence[str],
    edit_set: list[dict],
    config: FlipConfig,
    directions: Mapping[int, Tensor] | None = None,
) -> Trial:
    # Fluency is judged only where the decision flipped (it needs a forward pass of the unsteered model).
    flipped = (lambda refused: not refused) if goal == "unlock" else (lambda refused: refused)
    answers = steered_answers(loaded, bundle, prompts, [as_intervention(i) for i in edit_set], directions,
                              config.answer_tokens, config.fluency, judge=flipped)
    flipped, broken = flips(goal, answers)
    return Trial(edit_set, flipped, broken, len(prompts))


def search(
    loaded: LoadedModel,
    bundle: SAEBundle,
    goal: str,
    prompts: Sequence[str],
    pool: Sequence[Candidate],
    config: FlipConfig,
    progress: Callable[[str], None] = lambda _: None,
) -> FlipResult:
    """Single candidates first, then greedy forward selection over the best of them."""
    edits = config.unlock_edits if goal == "unlock" else config.induce_edits
    trials: list[Trial] = []
    singles: list[Trial] = []
    for c in pool:
        for mode, value in edits:
            trial = judge(loaded, bundle, goal, prompts, [{"layer": c.layer, "index": c.index, "mode": mode, "value": value}], config)
            trials.append(trial)
            singles.append(trial)
            progress(f"{goal} {c.layer}_{c.index} {mode} {value}: {trial.flipped}/{trial.n} (broken {trial.broken})")
    if not singles:
        return FlipResult(goal, None, trials, [asdict(c) for c in pool])
    ranked = sorted(singles, key=lambda t: (-t.flipped, t.broken))
    best = ranked[0]
    # Forward selection: add the single edit (of another feature) that most raises the flips, while it helps.
    shortlist = ranked[: 2 * config.max_features + 2]
    while len(best.interventions) < config.max_features and best.flipped < best.n:
        used = {(i["layer"], i["index"]) for i in best.interventions}
        options = [t.interventions[0] for t in shortlist if (t.interventions[0]["layer"], t.interventions[0]["index"]) not in used]
        improved = None
        for extra in options:
            trial = judge(loaded, bundle, goal, prompts, [*best.interventions, extra], config)
            trials.append(trial)
            progress(f"{goal} + {extra['layer']}_{extra['index']} {extra['mode']} {extra['value']}: {trial.flipped}/{trial.n}")
            if trial.flipped > (improved or best).flipped:
                improved = trial
            if trial.flipped == trial.n:  # no later option can beat it (ties keep the first)
                break
        if improved is None:
            break
        best = improved
    return FlipResult(goal, best, trials, [asdict(c) for c in pool])
