"""Does a run's safety map work on prompts it never saw? Held-out detection and the language gap.

- Per-domain detection (held-out `score` split, English prompts: the requests a chat sees): a query's domain score is
  the maximum normalised activation, over the query's tokens and over every feature tagged with that
  domain (all layers). AUROC of the domain's harmful queries against the benign ones, and separately
  against the benign look-alikes ("How do I kill a stuck Python process?", contrastive twins).
- Language gap (the paper's Hindi finding): on the Concept Contrastive Query Pairs that the filter did
  not see (`explain` and `score` splits), per language, how strongly the pair's domain features fire on
  the concept query and on its twin, and how often they fire at all (normalised activation > tau).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from offline_pipeline.corpus.records import SAFETY_DOMAINS


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Area under the ROC curve of scores separating positives from negatives (None without both).

    The Mann-Whitney form (ties count half), a tenth of `roc_auc_score`'s time: the filter's detector selection
    computes thousands."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    scores = np.concatenate([positive, negative]).astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("AUROC of non-finite scores")
    ranks = rankdata(scores)
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def domain_scores(
    normalised: dict[int, np.ndarray],
    tags: dict[str, list[tuple[int, int]]],
    n_queries: int,
    domains: Sequence[str] = SAFETY_DOMAINS,
) -> dict[str, np.ndarray]:
    """Per domain, the max normalised activation of its tagged (layer, index) features per query (0 without any)."""
    out = {}
    for domain in domains:
        score = np.zeros(n_queries, dtype=np.float64)
        for layer, index in tags.get(domain, []):
            score = np.maximum(score, np.nan_to_num(normalised[layer][:, index]))
        out[domain] = score
    return out


def detection(records: Sequence[dict], scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """AUROC per domain on the held-out score split (English prompts and texts)."""
    held_out = [
        i for i, r in enumerate(records) if r["split"] == "score" and r["language"] == "en" and r["kind"] == "prompt"
    ]
    benign = [i for i in held_out if records[i]["domain"] == "benign" and not records[i]["is_lookalike"]]
    results = {}
    for domain in SAFETY_DOMAINS:
        harmful = [i for i in held_out if records[i]["domain"] == domain and records[i]["pair_id"] is None]
        concept_queries = [i for i in held_out if records[i]["domain"] == domain and records[i]["pair_id"] is not None]
        lookalike = [i for i in held_out if records[i]["is_lookalike"] and records[i]["looks_like"] == domain]
        positive = harmful + concept_queries
        s = scores[domain]
        results[domain] = {
            "auroc_vs_benign": auroc(s[positive], s[benign]),
            "auroc_vs_lookalike": auroc(s[positive], s[lookalike]),
            "n_harmful": len(positive),
            "n_benign": len(benign),
            "n_lookalike": len(lookalike),
        }
    return results


def refusal_detection(records: Sequence[dict], score: np.ndarray) -> dict:
    """On the held-out score split's prompts with a refusal label: how often the model refused (harmful and
    benign prompts), and the AUROC of the refusal features' score for refused against answered prompts."""
    labelled = [i for i, r in enumerate(records) if r["split"] == "score" and r.get("refused") is not None]
    refused = [i for i in labelled if records[i]["refused"]]
    answered = [i for i in labelled if not records[i]["refused"]]
    harmful = [i for i in labelled if records[i]["domain"] in SAFETY_DOMAINS]
    benign = [i for i in labelled if records[i]["domain"] == "benign"]
    return {
        "n": len(labelled),
        "harmful_refused": float(np.mean([records[i]["refused"] for i in harmful])) if harmful else None,
        "benign_refused": float(np.mean([records[i]["refused"] for i in benign])) if benign else None,
        "auroc": auroc(score[refused], score[answered]),
    }


def language_gap(records: Sequence[dict], scores: dict[str, np.ndarray], tau: float) -> dict[str, dict]:
    """Per language: mean domain score on concept queries and twins, and the share of queries above tau."""
    by_pair: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for i, r in enumerate(records):
        if r["pair_id"] is not None and r["kind"] == "prompt" and r["split"] in ("explain", "score"):
            by_pair[(r["pair_id"], r["language"])]["twin" if r["is_lookalike"] else "query"] = i
    rows: dict[str, dict] = {}
    per_language: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for (_, language), halves in sorted(by_pair.items()):
        if "query" not in halves or "twin" not in halves:
            continue
        domain = records[halves["query"]]["domain"]
        s = scores[domain]
        per_language[language].append((domain, float(s[halves["query"]]), float(s[halves["twin"]])))
    for language, items in sorted(per_language.items()):
        query = np.array([q for _, q, _ in items])
        twin = np.array([t for _, _, t in items])
        domains: dict[str, list[float]] = defaultdict(list)
        for domain, q, _ in items:
            domains[domain].append(q)
        rows[language] = {
            "n_pairs": len(items),
            "mean_query": float(query.mean()),
            "mean_twin": float(twin.mean()),
            "query_fire_rate": float((query > tau).mean()),
            "twin_fire_rate": float((twin > tau).mean()),
            "separated": float((query > twin).mean()),
            "per_domain_mean_query": {d: float(np.mean(v)) for d, v in sorted(domains.items())},
        }
    return rows
