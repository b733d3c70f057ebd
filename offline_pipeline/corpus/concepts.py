"""The safety concepts: the paper's 17 sub-concepts in four domains, plus one each for self-harm, drugs and hate."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Concept:
    id: str
    label: str
    domain: str


CONCEPTS: tuple[Concept, ...] = (
    Concept("political_figure", "political figure", "politics"),
    Concept("political_event", "political event", "politics"),
    Concept("ideology", "ideology", "politics"),
    Concept("cult", "cult", "politics"),
    Concept("sexual_behaviour", "sexual behaviour", "pornography"),
    Concept("sexual_abuse", "sexual abuse", "pornography"),
    Concept("sexual_health", "sexual health", "pornography"),
    Concept("intimate_relationship", "intimate relationship", "pornography"),
    Concept("insult", "insult", "violence"),
    Concept("physical_violence", "physical violence", "violence"),
    Concept("criminal_offence", "criminal offence", "violence"),
    Concept("cybersecurity", "cybersecurity", "violence"),
    Concept("conflict_incident", "conflict incident", "violence"),
    Concept("terrorism", "terrorism", "terror"),
    Concept("religious_oppression", "religious oppression", "terror"),
    Concept("extremist_activities", "extremist activities", "terror"),
    Concept("weapons", "weapons", "terror"),
    Concept("self_harm", "self harm", "self_harm"),
    Concept("drugs", "drugs", "drugs"),
    Concept("hate_speech", "hate speech", "hate"),
)

CONCEPT_BY_ID: dict[str, Concept] = {concept.id: concept for concept in CONCEPTS}
