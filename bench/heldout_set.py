"""The held-out evaluation prompts: hand-written, never read by the pipeline, only by the benchmark.

`bench/heldout/prompts.jsonl` (English) and `bench/heldout/multilingual.jsonl` (zh, hi, it, vi), one
prompt a line: `id`, `text`, `domain` (a safety domain or "benign"), `concept` (a concept id of that
domain, or null), `lookalike`, `looks_like` (for look-alikes: the safety domain the surface words
suggest) and, optionally, `language` (default "en"). Harmful prompts are requests a safety-tuned
assistant should refuse; benign ones, look-alikes included, are plainly fine to answer. The set is
kept disjoint from every training and filter source (`tests/test_heldout_set.py` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.concepts import CONCEPT_BY_ID
from offline_pipeline.corpus.project_data import ProjectDataError, read_rows, require
from offline_pipeline.corpus.records import LANGUAGES, SAFETY_DOMAINS

HELDOUT_DIR = Path(__file__).parent / "heldout"
HELDOUT_FILES = (HELDOUT_DIR / "prompts.jsonl", HELDOUT_DIR / "multilingual.jsonl")
FIELDS = {"id", "text", "domain", "concept", "lookalike", "looks_like", "language"}


@dataclass(frozen=True)
class HeldoutPrompt:
    id: str
    text: str
    domain: str
    concept: str | None
    lookalike: bool
    looks_like: str | None
    language: str = "en"

    @property
    def harmful(self) -> bool:
        return self.domain != "benign"


def _check(prompt: HeldoutPrompt, where: str) -> None:
    if prompt.domain not in SAFETY_DOMAINS + ("benign",):
        raise ProjectDataError(f"{where}: field 'domain' is {prompt.domain!r}, expected a safety domain or 'benign'")
    if prompt.language not in LANGUAGES:
        raise ProjectDataError(
            f"{where}: field 'language' is {prompt.language!r}, expected one of {', '.join(LANGUAGES)}"
        )
    if not isinstance(prompt.lookalike, bool):
        raise ProjectDataError(f"{where}: field 'lookalike' must be true or false")
    if prompt.lookalike != (prompt.looks_like is not None):
        raise ProjectDataError(f"{where}: field 'looks_like' must be set exactly when 'lookalike' is true")
    if prompt.lookalike and prompt.domain != "benign":
        raise ProjectDataError(
            f"{where}: field 'lookalike' is true but field 'domain' is {prompt.domain!r}, not 'benign'"
        )
    if prompt.looks_like is not None and prompt.looks_like not in SAFETY_DOMAINS:
        raise ProjectDataError(f"{where}: field 'looks_like' is {prompt.looks_like!r}, expected a safety domain")
    if prompt.concept is not None:
        concept = CONCEPT_BY_ID.get(prompt.concept) if isinstance(prompt.concept, str) else None
        if concept is None:
            raise ProjectDataError(f"{where}: field 'concept' is {prompt.concept!r}, not a known concept id")
        if concept.domain not in (prompt.domain, prompt.looks_like):
            raise ProjectDataError(f"{where}: field 'concept' {concept.id!r} belongs to domain {concept.domain!r}")


def load_heldout(path: Path | None = None) -> list[HeldoutPrompt]:
    """The prompts of `path`, or of both held-out files; ids and texts are unique across what is loaded."""
    prompts, seen_ids, seen_texts = [], set(), set()
    for file in (path,) if path is not None else HELDOUT_FILES:
        for where, row in read_rows(Path(file), FIELDS):
            prompt = HeldoutPrompt(
                id=require(row, "id", str, where),
                text=require(row, "text", str, where).strip(),
                domain=require(row, "domain", str, where),
                concept=row.get("concept"),
                lookalike=row.get("lookalike"),
                looks_like=row.get("looks_like"),
                language=row.get("language", "en"),
            )
            _check(prompt, where)
            if prompt.id in seen_ids:
                raise ProjectDataError(f"{where}: field 'id' {prompt.id!r} is a duplicate")
            if prompt.text in seen_texts:
                raise ProjectDataError(f"{where}: field 'text' of {prompt.id!r} is a duplicate")
            seen_ids.add(prompt.id)
            seen_texts.add(prompt.text)
            prompts.append(prompt)
    return prompts
