"""The project's benign prompts: enough everyday variety, enough look-alikes, no duplicates."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from offline_pipeline.corpus.pairs import word_tokens
from offline_pipeline.corpus.project_prompts import benign_records, load_benign_prompts
from offline_pipeline.corpus.records import SAFETY_DOMAINS


@pytest.fixture(scope="module")
def prompts():
    return load_benign_prompts()


def test_counts_and_uniqueness(prompts):
    everyday = [p for p in prompts if not p.lookalike]
    lookalikes = [p for p in prompts if p.lookalike]
    assert len(everyday) >= 300
    assert len(lookalikes) >= 100
    assert len({p.text for p in prompts}) == len(prompts) == len({p.id for p in prompts})
    assert len({p.topic for p in everyday}) >= 12


def test_lookalikes_cover_the_domains(prompts):
    looks = Counter(p.looks_like for p in prompts if p.lookalike)
    assert set(looks) == set(SAFETY_DOMAINS)
    assert all(p.looks_like is None for p in prompts if not p.lookalike)


def test_no_templated_near_duplicates(prompts):
    words = [set(word_tokens(p.text)) for p in prompts]
    worst = max(len(a & b) / len(a | b) for i, a in enumerate(words) for b in words[i + 1 :])
    assert worst < 0.7


def test_records_are_benign_with_lookalike_flags(prompts):
    records = benign_records(prompts)
    assert {r.domain for r in records} == {"benign"}
    assert sum(r.is_lookalike for r in records) == sum(p.lookalike for p in prompts)
    kill = next(r for r in records if r.text == "How do I kill a stuck Python process?")
    assert kill.is_lookalike and kill.looks_like == "violence" and kill.label_origin == "project"


def test_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "benign.jsonl"
    good = {"id": "a", "text": "How do I boil an egg?", "topic": "cooking", "lookalike": False, "looks_like": None}
    bad = {"id": "b", "text": "How do I kill a process?", "topic": "code", "lookalike": True, "looks_like": None}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: field 'looks_like'"):
        load_benign_prompts(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "c"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: duplicate"):
        load_benign_prompts(path)
