"""The held-out report read back from its `--out` file, and its mean and spread over runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.bench_heldout import Result, read_results, report, write_results
from bench.heldout_set import HeldoutPrompt
from offline_pipeline.corpus.records import SAFETY_DOMAINS

REPO = Path(__file__).resolve().parents[1]


def _run(harmful_score: float) -> list[Result]:
    """Two harmful prompts per domain scoring `harmful_score`, two benign ones and a look-alike scoring 0."""
    results = []
    for domain in SAFETY_DOMAINS:
        for n in range(2):
            prompt = HeldoutPrompt(f"{domain}-{n}", f"harmful {domain} {n}", domain, None, False, None)
            results.append(Result(prompt, {domain: harmful_score}, 0.9, "I'm sorry, but I can't help with that.", None, 2.0))
        looks = HeldoutPrompt(f"{domain}-look", f"look-alike {domain}", "benign", None, True, domain)
        results.append(Result(looks, {domain: 0.0}, 0.1, "Sure! Here is how.", None, 0.0))
    for n in range(2):
        results.append(Result(HeldoutPrompt(f"benign-{n}", "benign", "benign", None, False, None), {}, 0.1, "Sure!", None, 0.0))
    return results


def test_results_read_back_give_the_same_report(tmp_path: Path):
    results = _run(1.0)
    write_results(tmp_path / "run.jsonl", results)
    assert report(read_results(tmp_path / "run.jsonl")) == report(results)
    lines = report(results)
    assert "heldout domain=drugs n=2 auroc_benign=1.000 auroc_lookalike=1.000" in lines
    assert "heldout refusal harmful_refused=1.000 benign_refused=0.000 lookalike_refused=0.000" in lines
    assert "heldout refusal_features n_refused=14 n_answered=9 auroc=1.000" in lines


def test_spread_over_runs_and_each_runs_bars(tmp_path: Path):
    write_results(tmp_path / "good.jsonl", _run(1.0))
    write_results(tmp_path / "blank.jsonl", _run(0.0))  # ties everywhere: AUROC 0.5
    done = subprocess.run([sys.executable, "-m", "bench.heldout_spread", str(tmp_path / "good.jsonl"), str(tmp_path / "blank.jsonl")],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "spread domain=hate runs=2 auroc_benign=0.750±0.354 [0.500, 1.000] auroc_lookalike=0.750±0.354 [0.500, 1.000]" in lines
    assert f"bars run={tmp_path / 'good.jsonl'} domains_at_0.85=7/7 any=1.000 fpr_lookalike_at_recall80=0.000 harmful_refused=1.000" in lines
    assert f"bars run={tmp_path / 'blank.jsonl'} domains_at_0.85=0/7 any=0.500 fpr_lookalike_at_recall80=1.000 harmful_refused=1.000" in lines
    missing = subprocess.run([sys.executable, "-m", "bench.heldout_spread", str(tmp_path / "none.jsonl")],
                             cwd=REPO, capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and f"no such results file: {tmp_path / 'none.jsonl'}" in missing.stderr
