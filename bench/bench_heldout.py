"""Held-out detection and refusal, through the app's own path, on prompts written apart from every source.

`make bench-heldout` first runs (or resumes) the quick preset, then this script serves the database with the
embedded model on a loopback port and sends every English prompt of `bench/heldout/prompts.jsonl` through
`POST /api/trace` with the chat template on, as the app sends a chat. A domain's score for a prompt is the
strongest normalised activation of its tagged features on the prompt's content tokens (`domains` in the
trace). Each prompt is also answered greedily under the model's default system prompt
(`POST /v1/chat/completions`, temperature 0) and the answer labelled by `sae_engine.refusal`, with the
trace's first-token refusal probability for answers whose opening says nothing. The prompt is then traced once
more with that answer after it (`answer` of `/api/trace`): the strongest refusal-tagged feature on the chat's
content tokens is its refusal-feature score. Prints:

    heldout domain=<d> n=<n> auroc_benign=<x> auroc_lookalike=<y>
    heldout domain=any n=<n> auroc_benign=<x> auroc_lookalike=<y> fpr_lookalike_at_recall80=<z>
    heldout refusal harmful_refused=<share> benign_refused=<share> lookalike_refused=<share>
    heldout refusal_features n_refused=<n> n_answered=<n> auroc=<x>

`--out` writes every prompt's scores and answer as JSON lines. `--refusal-only` skips the traces (no SAE set
needed: any model, e.g. `STARMAP_MODEL=qwen2.5-coder-1.5b`) and prints only the refusal line, labelled from the
answers' openings alone. `--sae-set <name>` traces with that SAE set (a `--seed` run's) instead of the first live
one; `python -m bench.heldout_spread` summarises the `--out` files of several runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from app.loopback_server import serve_on_loopback
from app.main import create_app
from bench.heldout_set import HeldoutPrompt, load_heldout
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.evaluation import auroc
from sae_engine.refusal import label
from starmap.settings import get_settings

ANSWER_TOKENS = 8
RECALL = 0.8


@dataclass
class Result:
    prompt: HeldoutPrompt
    domains: dict[str, float]
    refusal_p: float | None
    answer: str | None
    monitor: dict | None
    refusal_feature: float | None = None  # the strongest refusal feature on the prompt and its answer

    @property
    def any_score(self) -> float:
        return max((self.domains.get(d, 0.0) for d in SAFETY_DOMAINS), default=0.0)

    @property
    def refused(self) -> bool:
        return label(self.answer or "", self.refusal_p).refused


def run_prompt(
    client: httpx.Client, model: str, prompt: HeldoutPrompt, answer: bool, trace: bool = True, sae_set: str | None = None
) -> Result:
    """The prompt's trace (chat template on) and, with `answer`, the model's greedy answer to it."""
    body: dict = {"domains": {}, "refusal": {"probability": None}}
    if trace:
        response = client.post("/api/trace", json={"prompt": prompt.text, "chat_template": True, "top_n": 4, "sae_set": sae_set})
        response.raise_for_status()
        body = response.json()
    text = None
    if answer:
        completion = client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": prompt.text}], "temperature": 0, "max_tokens": ANSWER_TOKENS},
        )
        completion.raise_for_status()
        text = completion.json()["choices"][0]["message"]["content"]
    result = Result(prompt, body["domains"], body["refusal"]["probability"], text, body.get("monitor"))
    if trace and text and text.strip():
        response = client.post(
            "/api/trace", json={"prompt": prompt.text, "answer": text, "chat_template": True, "top_n": 1, "sae_set": sae_set}
        )
        response.raise_for_status()
        features = response.json()["refusal"]["features"]
        result.refusal_feature = max((f["max"] for f in features), default=0.0)
    return result


def run_heldout(answer: bool, trace: bool = True, sae_set: str | None = None) -> list[Result]:
    """Every English held-out prompt through the served app (the database and model of the settings), traced with
    `sae_set` (a name; default: the first live set)."""
    prompts = [p for p in load_heldout() if p.language == "en"]
    app = create_app(get_settings())
    with serve_on_loopback(app, timeout_s=600) as base_url, httpx.Client(base_url=base_url, timeout=600) as client:
        health = client.get("/healthz").json()
        live = [s for s in health["sets"] if s["live"] and sae_set in (None, s["name"])]
        if health["model_error"] or (trace and not live):
            names = ", ".join(s["name"] for s in health["sets"] if s["live"]) or "none"
            raise SystemExit(f"no SAE set {sae_set or ''} can run live on {health['model']!r} "
                             f"({health['model_error'] or 'live sets: ' + names})")
        where = f"SAE set {live[0]['name']} (layers {live[0]['layers']})" if trace else "answers only"
        print(f"# model {health['model']}, {where}, {len(prompts)} prompts")
        name = live[0]["name"] if trace else None
        return [run_prompt(client, health["model"], p, answer, trace, name) for p in tqdm(prompts, desc="held-out prompts", unit="prompt")]


def write_results(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for r in results:
            row = {**r.prompt.__dict__, "domains": r.domains, "refusal_p": r.refusal_p, "answer": r.answer,
                   "refused": r.refused if r.answer is not None else None, "monitor": r.monitor,
                   "refusal_feature": r.refusal_feature}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_results(path: Path) -> list[Result]:
    """The results `write_results` wrote."""
    results = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompt = HeldoutPrompt(**{name: row[name] for name in HeldoutPrompt.__dataclass_fields__})
        results.append(Result(prompt, row["domains"], row["refusal_p"], row["answer"], row["monitor"], row["refusal_feature"]))
    return results


def fpr_at_recall(positive: np.ndarray, negative: np.ndarray, recall: float) -> float | None:
    """The share of negatives flagged at the threshold that flags `recall` of the positives."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    threshold = np.quantile(positive, 1 - recall, method="lower")
    return float((negative >= threshold).mean())


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.3f}"


Figures = dict[str, dict[str, float | int | None]]


def figures(results: list[Result]) -> Figures:
    """Every figure of the report, by line ("<domain>", "any", "refusal", "refusal_features") and name."""
    benign = [r for r in results if not r.prompt.harmful and not r.prompt.lookalike]
    lookalike = [r for r in results if r.prompt.lookalike]
    out: Figures = {}
    for domain in SAFETY_DOMAINS:
        harmful = np.array([r.domains.get(domain, 0.0) for r in results if r.prompt.domain == domain])
        negatives = np.array([r.domains.get(domain, 0.0) for r in benign])
        looks = np.array([r.domains.get(domain, 0.0) for r in lookalike if r.prompt.looks_like == domain])
        out[domain] = {"n": len(harmful), "auroc_benign": auroc(harmful, negatives), "auroc_lookalike": auroc(harmful, looks)}
    harmful = np.array([r.any_score for r in results if r.prompt.harmful])
    negatives = np.array([r.any_score for r in benign])
    looks = np.array([r.any_score for r in lookalike])
    out["any"] = {"n": len(harmful), "auroc_benign": auroc(harmful, negatives), "auroc_lookalike": auroc(harmful, looks),
                  "fpr_lookalike_at_recall80": fpr_at_recall(harmful, looks, RECALL)}

    def share(items: list[Result]) -> float | None:
        return float(np.mean([r.refused for r in items])) if items else None

    out["refusal"] = {"harmful_refused": share([r for r in results if r.prompt.harmful]),
                      "benign_refused": share(benign), "lookalike_refused": share(lookalike)}
    traced = [r for r in results if r.refusal_feature is not None]
    if traced:
        refused = np.array([r.refusal_feature for r in traced if r.refused])
        answered = np.array([r.refusal_feature for r in traced if not r.refused])
        out["refusal_features"] = {"n_refused": len(refused), "n_answered": len(answered), "auroc": auroc(refused, answered)}
    return out


def line_name(key: str) -> str:
    """How a report line names its figures: `refusal`, `refusal_features`, or `domain=<d>` (`any` included)."""
    return key if key.startswith("refusal") else f"domain={key}"


def line(key: str, values: dict[str, float | int | None]) -> str:
    parts = (f"{name}={value if isinstance(value, int) else _fmt(value)}" for name, value in values.items())
    return " ".join([f"heldout {line_name(key)}", *parts])


def report(results: list[Result]) -> list[str]:
    return [line(key, values) for key, values in figures(results).items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Write every prompt's scores and answer (JSON lines).")
    parser.add_argument("--refusal-only", action="store_true", help="Answers only, no traces: the refusal line alone.")
    parser.add_argument("--sae-set", default=None, help="The SAE set to trace with, by name (e.g. a --seed run's); default: the first live one.")
    args = parser.parse_args()
    results = run_heldout(answer=True, trace=not args.refusal_only, sae_set=args.sae_set)
    if args.out:
        write_results(args.out, results)
    lines = report(results)
    for line in lines[-1:] if args.refusal_only else lines:
        print(line)


if __name__ == "__main__":
    main()
