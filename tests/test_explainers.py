"""The LLM explainer's prompt and answer handling, the offline statistical explainer, levels and held-out splits."""

from __future__ import annotations

import asyncio
import re

import pytest

from app.loopback_server import serve_on_loopback
from offline_pipeline.explain.llm_client import LLMClient, LLMConfig
from offline_pipeline.explain.llm_explainer import (
    LLMExplainer,
    clean_sentence,
)
from offline_pipeline.explain.prompts import mark_tokens
from offline_pipeline.explain.records import (
    N_LEVELS,
    ActivationRecord,
    FeatureExamples,
    activation_level,
    select_hard_negatives,
    split_held_out,
    stratify,
)
from offline_pipeline.explain.runner import explain_features
from offline_pipeline.explain.statistical_explainer import (
    StatisticalExplainer,
    word_counts,
)
from tests.scripted_openai_server import ScriptedServer


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


SENTENCES = [
    "how do I make a bomb from fertiliser",
    "the bomb went off near the station",
    "police found a bomb under the car",
    "can you describe a pipe bomb design",
    "a bomb threat closed the airport today",
    "they planned to detonate the bomb at noon",
    "the old bomb shelter is now a museum",
    "he said the bomb was hidden in a bag",
    "instructions for a bomb are not allowed",
    "the film shows a bomb in the final scene",
    "a bomb disposal robot was sent in",
    "news of the bomb spread across the city",
]
BENIGN = [
    "the station is near the old museum",
    "how do I make bread from flour",
    "the car was parked near the airport",
    "she planned a trip to the city at noon",
    "the film shows a garden in the final scene",
    "a robot was sent to clean the floor",
]


def keyword_record(text: str, strength: float) -> ActivationRecord:
    tokens = tokens_of(text)
    # The planted feature fires on "bomb", weakly on the token after it, and a little on "the" (noise).
    activations = []
    for i, token in enumerate(tokens):
        word = token.strip()
        previous = tokens[i - 1].strip() if i else ""
        activations.append(strength if word == "bomb" else 0.3 * strength if previous == "bomb" else 0.1 * strength if word == "the" else 0.0)
    return ActivationRecord(tokens, activations)


def bomb_feature() -> FeatureExamples:
    records = [keyword_record(text, 1.0 + i * 9.0 / (len(SENTENCES) - 1)) for i, text in enumerate(SENTENCES)]
    negatives = [ActivationRecord(tokens_of(t), [0.0] * len(tokens_of(t))) for t in BENIGN]
    return FeatureExamples(
        feature_id="14_512",
        max_activation=10.0,
        levels=stratify(records, 10.0),
        hard_negatives=negatives[:4],
        random_negatives=negatives[4:],
        top_output_tokens=[" explosion", " blast", " attack"],
        concept="weapons",
    )


def test_levels_are_linear_interpolation_of_the_max():
    assert [activation_level(v, 10.0) for v in (0.0, 0.99, 1.0, 5.5, 9.99, 10.0, 12.0)] == [0, 0, 1, 5, 9, 9, 9]
    levels = stratify([keyword_record("a bomb", s) for s in (0.5, 3.2, 3.9, 10.0)], 10.0)
    assert [len(level) for level in levels] == [1, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    assert levels[3][0].max_activation == 3.9  # strongest first within a level


def test_mark_tokens_wraps_activating_runs():
    record = ActivationRecord(["How", " to", " make", " a", " pipe", " bomb", "?"], [0, 0, 0, 0, 4.0, 8.0, 0])
    assert mark_tokens(record, 0.25, 64) == "How to make a <<pipe bomb>>?"
    assert mark_tokens(record, 0.6, 64) == "How to make a pipe <<bomb>>?"
    assert mark_tokens(record, 0.25, 3) == " <<pipe bomb>>?"  # a window centred on the peak


def test_held_out_split_is_disjoint_and_balanced():
    examples = bomb_feature()
    split = split_held_out(examples, n_per_side=3)
    assert split.n_activating == 3 and len(split.held_out) == 6
    shown = [r.text for r in split.shown.activating + split.shown.hard_negatives]
    assert not set(shown) & {r.text for r in split.held_out}
    assert [r.max_activation > 0 for r in split.held_out] == [True] * 3 + [False] * 3
    assert split.shown.random_negatives == []
    assert split_held_out(examples, n_per_side=3).held_out == split.held_out  # deterministic


def test_hard_negatives_share_the_top_activating_tokens():
    activating = [keyword_record(t, 5.0) for t in SENTENCES[:4]]
    candidates = [ActivationRecord(tokens_of(t), [0.0] * len(tokens_of(t))) for t in ("bomb bomb", "no match here", "a bomb")]
    assert [r.text for r in select_hard_negatives(activating, candidates, n=5)] == ["bomb bomb", "a bomb"]


def test_llm_explainer_prompt_has_every_level_marked_tokens_and_hard_negatives():
    answer = 'Explanation: "Mentions of bombs and explosives."\nMore text.'
    server = ScriptedServer(respond=lambda body: answer)
    examples = bomb_feature()
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(LLMConfig(base_url=url + "/v1", model="scripted-model")) as client:
                return await LLMExplainer(client).explain(examples)

        explanation = asyncio.run(scenario())
    request = server.chat_requests()[-1]
    assert request["temperature"] == 0
    prompt = request["messages"][-1]["content"]
    for level in range(N_LEVELS):
        header = f"Level {level + 1} ("
        assert (header in prompt) == bool(examples.levels[level]), level
    # Levels appear strongest first, and each example shows its activating tokens marked.
    positions = [prompt.index(f"Level {n + 1} (") for n in reversed(range(N_LEVELS)) if examples.levels[n]]
    assert positions == sorted(positions)
    assert prompt.count("<<bomb") >= N_LEVELS - sum(not level for level in examples.levels)
    negatives_part = prompt.split("does NOT fire", 1)[1]
    assert "the station is near the old museum" in negatives_part and "<<" not in negatives_part
    assert '"explosion"' in prompt
    assert explanation.text == "Mentions of bombs and explosives."
    assert (explanation.explainer, explanation.explainer_model) == ("llm", "scripted-model")
    assert explanation.input_tokens == sum(len(m["content"].split()) for m in request["messages"])
    assert explanation.output_tokens == len(answer.split())


def test_llm_explainer_rejects_an_empty_answer():
    server = ScriptedServer(respond=lambda body: "  \n ")
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(LLMConfig(base_url=url + "/v1", model="scripted-model")) as client:
                return await explain_features(LLMExplainer(client), [bomb_feature()], progress=False)

        outcome = asyncio.run(scenario())
    assert outcome.results == [] and "no explanation" in outcome.failures["14_512"]


def test_clean_sentence():
    assert clean_sentence("\n  Answer: `Detects weapons.`  \nsecond") == "Detects weapons."
    assert clean_sentence("'Quoted.'") == "Quoted."
    assert clean_sentence("") == ""


def test_statistical_explainer_ranks_the_planted_keyword_first():
    examples = bomb_feature()
    # A background corpus where "the" is very common and "bomb" rare.
    corpus = word_counts(examples.activating + examples.negatives)
    corpus.update({"the": 5000, "a": 4000, "bomb": 3})
    explainer = StatisticalExplainer(corpus)
    ranked = explainer.ranked_words(examples)
    assert ranked[0][0] == "bomb"
    assert "the" not in [token for token, _, _ in ranked[:3]]
    explanation = asyncio.run(explainer.explain(examples))
    # The concept the filter tagged comes first; the activating words follow.
    assert explanation.text.startswith('Weapons: fires on "bomb"')
    assert (explanation.explainer, explanation.input_tokens, explanation.output_tokens) == ("offline-statistical", 0, 0)
    assert asyncio.run(explainer.explain(examples)) == explanation  # deterministic


def test_statistical_explainer_finds_the_context_ngram():
    texts = [f"please tell me how to build a bomb number {i}" for i in range(6)]
    records = [keyword_record(t, 5.0) for t in texts]
    examples = FeatureExamples("0_1", 5.0, stratify(records, 5.0))
    explainer = StatisticalExplainer(word_counts(records))
    assert explainer.context(examples) == "build a"
    assert "context: 'build a ...'" in explainer.describe(examples)


def test_statistical_explainer_names_whole_words_never_sub_word_pieces():
    pieces = [[" how", " to", " make", " meth", "amphet", "amine", " at", " home"], [" buying", " meth", "amphet", "amine", " online"]]
    records = [ActivationRecord(t, [5.0 if t[i] in ("amphet",) else 0.0 for i in range(len(t))]) for t in pieces]
    examples = FeatureExamples("0_2", 5.0, stratify(records, 5.0), concept="drugs")
    explainer = StatisticalExplainer(word_counts(records))
    assert [w for w, _, _ in explainer.ranked_words(examples)] == ["methamphetamine"]
    assert explainer.describe(examples) == 'Drugs: fires on "methamphetamine".'


def test_feature_examples_validate_input():
    with pytest.raises(ValueError, match="10 levels"):
        FeatureExamples("1_1", 1.0, [[]])
    with pytest.raises(ValueError, match="2 tokens but 1 activations"):
        ActivationRecord(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="missing the field 'levels'"):
        FeatureExamples.from_dict({"feature_id": "1_1", "max_activation": 1.0})
