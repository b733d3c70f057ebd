"""What the explainers and scorers get for a feature: `FeatureExamples` built from the activation cache.

- Activating examples: the records kept by the stats stage's per-level reservoirs (10 levels by linear
  interpolation of the feature's max), each with the feature's activation on every content token (raw
  units): a chat record shows the user's words and, on a new line, the answer's; the template and the
  system prompt are never shown, as they are never counted.
- Random negatives: pool records, drawn with a per-feature seed, on which the feature stays at 0.
- Hard negatives: non-activating pool records that contain the tokens the feature peaks on
  (`select_hard_negatives`), found through an inverted index token id -> records.

Every record is encoded at most once per layer, and its token strings decoded once per run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from offline_pipeline.activation_cache import ActivationCache
from offline_pipeline.candidate_filter import FilterPass
from offline_pipeline.corpus.concepts import CONCEPT_BY_ID
from offline_pipeline.encoding import encode_records, sae_precision
from offline_pipeline.explain.records import (
    ActivationRecord,
    FeatureExamples,
    select_hard_negatives,
    token_words,
)
from offline_pipeline.explain.segments import decode_tokens
from sae_engine.topk import TopKSAE


class ExampleBuilder:
    def __init__(self, cache: ActivationCache, tokenizer, preset, pool: Sequence[int]):
        self.cache = cache
        self.tokenizer = tokenizer
        self.preset = preset
        self.pool = np.asarray(sorted(pool), dtype=np.int64)
        self._strings: dict[int, list[str]] = {}
        self._pieces: dict[int, str] = {}
        token_record = cache.record_of_token()
        in_pool = np.isin(token_record, self.pool) & cache.content
        pairs = np.unique(np.stack([cache.tokens[in_pool].astype(np.int64), token_record[in_pool]]), axis=1)
        self._index_tokens, self._index_records = pairs[0], pairs[1]

    def content_positions(self, record: int) -> np.ndarray:
        """The record's content tokens, as positions in the cache."""
        start, end = int(self.cache.offsets[record]), int(self.cache.offsets[record + 1])
        return start + np.flatnonzero(self.cache.content[start:end])

    def token_strings(self, record: int) -> list[str]:
        """Strings of the record's content tokens; each run of content after a gap (the answer after the
        template between the turns) starts on a new line."""
        if record not in self._strings:
            positions = self.content_positions(record)
            breaks = np.flatnonzero(np.diff(positions) > 1) + 1
            pieces: list[str] = []
            for n, run in enumerate(np.split(positions, breaks)):
                strings = self._decode_run(self.cache.tokens[run].tolist())
                if n and strings:
                    strings[0] = "\n" + strings[0].lstrip(" ")
                pieces += strings
            self._strings[record] = pieces
        return self._strings[record]

    def _decode_run(self, ids: list[int]) -> list[str]:
        pieces = [self._piece(i) for i in ids]
        whole = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        # Per-token decoding is exact unless a token splits a multi-byte character (or the
        # tokenizer merges across tokens); then the incremental, quadratic decoder is needed.
        if "".join(pieces) != whole or any("\ufffd" in p for p in pieces):
            pieces = decode_tokens(self.tokenizer, ids)
        return pieces

    def _piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self._pieces[token_id]

    def corpus_counts(self) -> dict[str, int]:
        """Word frequencies of the pool's content (the background of the statistical explainer's lift)."""
        counts: Counter[str] = Counter()
        for record in self.pool.tolist():
            counts.update(w for w, _ in token_words(self.token_strings(record)) if w)
        return dict(counts)

    def records_with_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.unique(self._index_records[np.isin(self._index_tokens, np.asarray(token_ids))])

    def _feature_acts(
        self, sae: TopKSAE, hook: str, usable: np.ndarray, records: Sequence[int], features: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """record -> (content tokens, len(features)) activations of the given features."""
        column = np.full(sae.d_sae, -1, dtype=np.int64)
        column[np.asarray(features)] = np.arange(len(features))
        out: dict[int, np.ndarray] = {}
        records = sorted({int(r) for r in records})
        for group, _, indices, values in encode_records(sae, self.cache, hook, records, usable, dtype=sae_precision(self.preset)):
            idx, val = indices.numpy(), values.numpy()
            start = 0
            for record in group:
                length = int(self.cache.offsets[record + 1] - self.cache.offsets[record])
                dense = np.zeros((length, len(features)), dtype=np.float32)
                rows, slots = np.nonzero(column[idx[start : start + length]] >= 0)
                dense[rows, column[idx[start + rows, slots]]] = val[start + rows, slots]
                out[record] = dense[self.content_positions(record) - int(self.cache.offsets[record])]
                start += length
        return out

    def build(
        self,
        layer: int,
        hook: str,
        sae: TopKSAE,
        usable: np.ndarray,
        stats: dict[str, np.ndarray],
        features: Sequence[int],
        passes: Sequence[FilterPass],
    ) -> list[FeatureExamples]:
        if not features:
            return []
        cfg = self.preset.explain
        reservoir = stats["reservoir_record"][np.asarray(features)]  # (features, levels, per_level)
        acts = self._feature_acts(sae, hook, usable, np.unique(reservoir[reservoir >= 0]), features)
        levels_of: list[list[list[ActivationRecord]]] = []
        candidates: set[int] = set()
        plans = []
        for j, feature in enumerate(features):
            levels = [
                [ActivationRecord(self.token_strings(r), acts[r][:, j].tolist()) for r in level_records if r >= 0]
                for level_records in reservoir[j]
            ]
            for level in levels:
                level.sort(key=lambda rec: -rec.max_activation)
            levels_of.append(levels)
            activating = {int(r) for r in reservoir[j].ravel() if r >= 0}
            peak_ids = self._peak_tokens(reservoir[j], acts, j)
            rng = np.random.default_rng([self.preset.train.seed, layer, int(feature)])
            others = np.setdiff1d(self.pool, np.fromiter(activating, dtype=np.int64, count=len(activating)))
            random_pick = rng.choice(others, size=min(len(others), 3 * cfg.n_random_negatives), replace=False)
            hard_pool = np.setdiff1d(self.records_with_tokens(peak_ids), np.fromiter(activating, dtype=np.int64, count=len(activating)))
            hard_pick = rng.choice(hard_pool, size=min(len(hard_pool), 3 * cfg.n_hard_negatives), replace=False)
            plans.append((random_pick.tolist(), hard_pick.tolist()))
            candidates.update(random_pick.tolist())
            candidates.update(hard_pick.tolist())
        negative_acts = self._feature_acts(sae, hook, usable, sorted(candidates), features)
        out = []
        best_pass = self._labels(passes)
        for j, feature in enumerate(features):
            random_pick, hard_pick = plans[j]

            activating = [rec for level in levels_of[j] for rec in level]
            out.append(
                FeatureExamples(
                    feature_id=f"{layer}_{feature}",
                    max_activation=float(stats["max"][feature]),
                    levels=levels_of[j],
                    hard_negatives=select_hard_negatives(activating, self._silent(hard_pick, negative_acts, j), cfg.n_hard_negatives),
                    top_output_tokens=[self.tokenizer.decode([int(i)]) for i in stats["top_ids"][feature]],
                    concept=best_pass.get(int(feature)),
                    random_negatives=self._silent(random_pick, negative_acts, j)[: cfg.n_random_negatives],
                )
            )
        return out

    def _silent(self, records: list[int], acts: dict[int, np.ndarray], j: int) -> list[ActivationRecord]:
        """The records on which feature column j never fires."""
        return [
            ActivationRecord(self.token_strings(r), acts[r][:, j].tolist()) for r in records if acts[r][:, j].max(initial=0.0) <= 0
        ]

    def _peak_tokens(self, reservoir_rows: np.ndarray, acts: dict[int, np.ndarray], j: int, n: int = 5) -> list[int]:
        counts: Counter[int] = Counter()
        for r in reservoir_rows.ravel():
            if r < 0:
                continue
            values = acts[int(r)][:, j]
            if values.size and values.max() > 0:
                counts[int(self.cache.tokens[self.content_positions(int(r))[int(values.argmax())]])] += 1
        return [token for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

    @staticmethod
    def _labels(passes: Sequence[FilterPass]) -> dict[int, str]:
        """feature -> the labels it passed the filter for, best first (precision, then recall; a concept is
        named by its label, a domain-level pass by its domain), e.g. "drugs, violence"."""
        by_feature: dict[int, list[FilterPass]] = {}
        for p in passes:
            by_feature.setdefault(p.feature, []).append(p)
        out = {}
        for feature, items in by_feature.items():
            names: list[str] = []
            for p in sorted(items, key=lambda p: (-p.precision, -p.recall, p.concept is None)):
                name = CONCEPT_BY_ID[p.concept].label if p.concept in CONCEPT_BY_ID else p.domain.replace("_", " ")
                if name not in names:
                    names.append(name)
            out[feature] = ", ".join(names)
        return out
