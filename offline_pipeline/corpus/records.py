"""One corpus record: a text with its provenance, its safety label and its split."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

SAFETY_DOMAINS = ("politics", "pornography", "violence", "terror", "self_harm", "drugs", "hate")
# `other`: a source marks the text as risky, but the risk lies outside the seven domains
# (privacy, misinformation, professional advice, generic jailbreak templates).
DOMAINS = SAFETY_DOMAINS + ("benign", "other")
# `opening`: a labelled prompt with the opening of the model's answer, where the refusal features are sought.
KINDS = ("prompt", "text", "chat", "opening")
ANSWERED_KINDS = ("chat", "opening")  # the kinds that carry the model's answer after the prompt
SPLITS = ("train", "filter", "explain", "score")
LANGUAGES = ("en", "zh", "hi", "it", "vi")
# Where the domain label comes from: the source's own label, the keyword lexicon, or project-written data.
LABEL_ORIGINS = ("source", "lexicon", "project")


def content_id(kind: str, text: str) -> str:
    """A stable id from the content alone, so the same text gets the same id in every build."""
    return hashlib.sha256(f"{kind}\n{text}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    text: str
    source: str
    licence: str
    domain: str
    kind: str
    concept: str | None = None
    language: str = "en"
    split: str | None = None
    record_id: str = ""
    is_lookalike: bool = False
    looks_like: str | None = None
    label_origin: str = "source"
    source_label: str | None = None
    pair_id: str | None = None
    prompt_id: str | None = None
    answer: str | None = None
    # The model's own answer to a prompt, as far as its opening: refused or not (`sae_engine.refusal`).
    refused: bool | None = None
    refusal_p: float | None = None
    opening: str | None = None

    def __post_init__(self) -> None:
        where = f"record from {self.source!r}"
        if not self.text.strip():
            raise ValueError(f"{where}: field 'text' is empty")
        for name, value, allowed in (
            ("domain", self.domain, DOMAINS),
            ("kind", self.kind, KINDS),
            ("language", self.language, LANGUAGES),
            ("label_origin", self.label_origin, LABEL_ORIGINS),
        ):
            if value not in allowed:
                raise ValueError(f"{where}: field {name!r} is {value!r}, expected one of {', '.join(allowed)}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"{where}: field 'split' is {self.split!r}, expected one of {', '.join(SPLITS)}")
        if self.looks_like is not None and self.looks_like not in SAFETY_DOMAINS:
            raise ValueError(f"{where}: field 'looks_like' is {self.looks_like!r}, expected a safety domain")
        if not self.record_id:
            object.__setattr__(self, "record_id", content_id(self.kind, self.text))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown record field(s): {', '.join(unknown)}")
        return cls(**data)
