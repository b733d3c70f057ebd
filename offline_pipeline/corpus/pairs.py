"""Concept Contrastive Query Pairs: a query that holds a safety concept and a minimally edited twin without it.

`offline_pipeline/data/contrastive_pairs.jsonl`, one pair a line: `pair_id`, `domain`, `concept`
(snake_case id from `concepts.py`), `concept_label`, `language` (en, zh, hi, it, vi), `query`, `twin`.
Translations share the English pair's `pair_id`, so (pair_id, language) is the key. The pairs are the
paper's pre-explanation data: features that separate query from twin are concept candidates, and the
translations test whether the same feature fires when the request changes language.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.concepts import CONCEPT_BY_ID
from offline_pipeline.corpus.project_data import (
    PROJECT_LICENCE,
    ProjectDataError,
    data_file,
    read_rows,
    require,
)
from offline_pipeline.corpus.records import LANGUAGES, Record

PAIRS_FILE = "contrastive_pairs.jsonl"
FIELDS = ("pair_id", "domain", "concept", "concept_label", "language", "query", "twin")
MIN_SHARED_FRACTION = 0.5
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class ContrastivePair:
    pair_id: str
    domain: str
    concept: str
    concept_label: str
    language: str
    query: str
    twin: str


def word_tokens(text: str) -> list[str]:
    """Lower-cased words with edge punctuation stripped; each Han character is a word of its own."""
    tokens = []
    for chunk in text.lower().split():
        for piece in _CJK.sub(lambda match: f" {match.group(0)} ", chunk).split():
            word = _strip_punctuation(piece)
            if word:
                tokens.append(word)
    return tokens


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _strip_punctuation(word: str) -> str:
    """The word without punctuation at its ends (inner apostrophes and hyphens stay)."""
    start, end = 0, len(word)
    while start < end and _is_punctuation(word[start]):
        start += 1
    while end > start and _is_punctuation(word[end - 1]):
        end -= 1
    return word[start:end]


def shared_fraction(query: str, twin: str) -> float:
    """The fraction of the query's words (with multiplicity) that the twin keeps."""
    query_words, twin_words = Counter(word_tokens(query)), Counter(word_tokens(twin))
    return sum((query_words & twin_words).values()) / max(1, sum(query_words.values()))


def length_tolerance(query_length: int) -> float:
    return max(4.0, 0.5 * query_length)


def check_minimal_edit(pair: ContrastivePair) -> str | None:
    """Why the twin is not a minimal edit of the query, or None when it is."""
    if pair.query == pair.twin:
        return "query and twin are identical"
    shared = shared_fraction(pair.query, pair.twin)
    if shared < MIN_SHARED_FRACTION:
        return f"twin keeps only {shared:.0%} of the query's words (needs {MIN_SHARED_FRACTION:.0%})"
    query_length, twin_length = len(word_tokens(pair.query)), len(word_tokens(pair.twin))
    if abs(query_length - twin_length) > length_tolerance(query_length):
        return f"lengths differ too much ({query_length} vs {twin_length} words)"
    return None


def load_pairs(path: Path | None = None) -> list[ContrastivePair]:
    path = path or data_file(PAIRS_FILE)
    pairs, keys = [], set()
    for where, row in read_rows(path, FIELDS):
        pair = ContrastivePair(**{field: require(row, field, str, where).strip() for field in FIELDS})
        concept = CONCEPT_BY_ID.get(pair.concept)
        if concept is None:
            raise ProjectDataError(f"{where}: field 'concept' is {pair.concept!r}, not a known concept id")
        if (pair.domain, pair.concept_label) != (concept.domain, concept.label):
            raise ProjectDataError(f"{where}: fields 'domain'/'concept_label' do not match concept {concept.id!r}")
        if pair.language not in LANGUAGES:
            raise ProjectDataError(
                f"{where}: field 'language' is {pair.language!r}, expected one of {', '.join(LANGUAGES)}"
            )
        if (pair.pair_id, pair.language) in keys:
            raise ProjectDataError(f"{where}: duplicate (pair_id, language) ({pair.pair_id!r}, {pair.language!r})")
        problem = check_minimal_edit(pair)
        if problem:
            raise ProjectDataError(f"{where}: pair {pair.pair_id!r} ({pair.language}): {problem}")
        keys.add((pair.pair_id, pair.language))
        pairs.append(pair)
    english = {pair.pair_id: pair for pair in pairs if pair.language == "en"}
    for pair in pairs:
        source = english.get(pair.pair_id)
        if pair.language != "en" and (source is None or source.concept != pair.concept):
            raise ProjectDataError(
                f"{path}: {pair.language} pair {pair.pair_id!r} has no English pair with the same concept"
            )
    return pairs


def pair_records(pairs: list[ContrastivePair] | None = None) -> list[Record]:
    """Two prompt records per pair: the query (its concept's domain) and the twin (benign, a look-alike)."""
    records = []
    for pair in load_pairs() if pairs is None else pairs:
        common = {
            "source": f"project:{PAIRS_FILE}",
            "licence": PROJECT_LICENCE,
            "kind": "prompt",
            "language": pair.language,
            "label_origin": "project",
            "pair_id": pair.pair_id,
        }
        records.append(
            Record(text=pair.query, domain=pair.domain, concept=pair.concept, source_label="query", **common)
        )
        records.append(
            Record(
                text=pair.twin,
                domain="benign",
                is_lookalike=True,
                looks_like=pair.domain,
                source_label="twin",
                **common,
            )
        )
    return records
