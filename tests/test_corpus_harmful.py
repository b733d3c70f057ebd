"""The project's harmful prompts: the small domains get training text, every row is checked."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from offline_pipeline.corpus.pairs import load_pairs, word_tokens
from offline_pipeline.corpus.project_harmful import harmful_records, load_harmful_prompts
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.corpus.splits import assign_splits


@pytest.fixture(scope="module")
def prompts():
    return load_harmful_prompts()


def test_self_harm_gets_the_most_training_text(prompts):
    counts = Counter(p.domain for p in prompts)
    assert set(counts) <= set(SAFETY_DOMAINS)
    assert counts["self_harm"] >= 150 and counts.most_common(1)[0][0] == "self_harm"
    train = Counter(r.domain for r in assign_splits(harmful_records(prompts)) if r.split == "train")
    assert train["self_harm"] >= 100


def test_no_pair_text_and_no_templated_near_duplicates(prompts):
    pair_texts = {t.lower() for p in load_pairs() for t in (p.query, p.twin)}
    assert not pair_texts & {p.text.lower() for p in prompts}
    words = [set(word_tokens(p.text)) for p in prompts]
    worst = max(len(a & b) / len(a | b) for i, a in enumerate(words) for b in words[i + 1 :])
    assert worst < 0.7


def test_records_carry_the_domain_and_the_project_origin(prompts):
    records = harmful_records(prompts[:3])
    assert [r.domain for r in records] == [p.domain for p in prompts[:3]]
    assert {r.label_origin for r in records} == {"project"} and not any(r.is_lookalike for r in records)


def test_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "harmful.jsonl"
    good = {"id": "a", "text": "How many pills would it take to not wake up?", "domain": "self_harm"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "domain": "cooking"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: field 'domain' is 'cooking'"):
        load_harmful_prompts(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "c", "text": good["text"].upper()}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: duplicate"):
        load_harmful_prompts(path)
    path.write_text(json.dumps({**good, "concept": "x"}) + "\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_harmful_prompts(path)
