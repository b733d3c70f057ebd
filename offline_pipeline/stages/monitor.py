"""Stage `monitor`: dense probes and k-sparse SAE probes per domain (`offline_pipeline.monitor`).

The queries are the English prompts as the app encodes them (chat template, default system prompt): the
training split's prompts and the `explain` split's contrastive pairs train the probes, the `filter` split's
prompts and pairs choose each probe's layer and representation and calibrate it; the `score` split is left for
the evaluation. Writes `monitor.json` (every monitor, and its validation AUROC).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from offline_pipeline.activation_cache import ActivationCache, iter_chunks
from offline_pipeline.corpus.records import SAFETY_DOMAINS
from offline_pipeline.monitor import ANY, MonitorConfig, dense_probe, ksparse_probe, task_labels
from offline_pipeline.runner import StageContext, write_json_atomic
from offline_pipeline.stages.activations import load_meta
from offline_pipeline.stages.cache_selection import counted_tokens
from offline_pipeline.stages.choose import load_choice
from offline_pipeline.stages.hooks import hook_name
from offline_pipeline.stages.stats import load_stats, normalised_queries


def monitor_queries(records: list[dict]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(record indices, train mask, validation mask) of the English prompts the monitors learn from."""
    chosen, train, validation = [], [], []
    for i, r in enumerate(records):
        if r["kind"] != "prompt" or r["language"] != "en":
            continue
        is_pair = r["pair_id"] is not None
        fits = r["split"] == ("explain" if is_pair else "train")
        checks = r["split"] == "filter"
        if fits or checks:
            chosen.append(i)
            train.append(fits)
            validation.append(checks)
    return chosen, np.array(train), np.array(validation)


def representations(cache: ActivationCache, hook: str, records: list[int], counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per record: the mean activation over its content tokens, and the activation at its last prompt token."""
    spans = [cache.token_span([r]) for r in records]
    content = [s[counted[s]] for s in spans]
    last = cache.answer_start[np.asarray(records)] - 1
    positions = np.concatenate([*content, last])
    owners = np.concatenate([np.full(len(c), row) for row, c in enumerate(content)] + [np.arange(len(records))])
    is_last = np.concatenate([np.zeros(sum(len(c) for c in content), dtype=bool), np.ones(len(records), dtype=bool)])
    d_model = cache.acts(hook).shape[1]
    sums = torch.zeros(len(records), d_model, dtype=torch.float64)
    at_last = torch.zeros(len(records), d_model, dtype=torch.float32)
    order = np.argsort(positions, kind="stable")
    start = 0
    for part, x in iter_chunks(cache, hook, positions[order], 16_384):
        rows = order[start : start + len(part)]
        start += len(part)
        mean_rows = ~is_last[rows]
        sums.index_add_(0, torch.from_numpy(owners[rows][mean_rows]), x[torch.from_numpy(mean_rows)].double())
        at_last[torch.from_numpy(owners[rows][~mean_rows])] = x[torch.from_numpy(~mean_rows)]
    counts = torch.tensor([max(len(c), 1) for c in content], dtype=torch.float64)[:, None]
    return (sums / counts).float().numpy(), at_last.numpy()


def run_monitor(ctx: StageContext) -> dict:
    preset = ctx.preset
    config: MonitorConfig = preset.monitor
    cache = ActivationCache.open(ctx.input("activations"))
    meta = load_meta(ctx)
    kind = load_choice(ctx)["hook_kind"]
    chosen, train, validation = monitor_queries(cache.records)
    domains = [cache.records[i]["domain"] for i in chosen]
    features: dict[tuple[int, str], np.ndarray] = {}
    maxima, columns = [], []
    for layer in preset.layers:
        hook = hook_name(layer, kind)
        mean, last = representations(cache, hook, chosen, counted_tokens(cache, meta, hook))
        features[(layer, "mean")], features[(layer, "last")] = mean, last
        stats = load_stats(ctx.input("stats"), layer)
        row_of = {int(r): row for row, r in enumerate(stats["query_records"])}
        maxima.append(np.nan_to_num(normalised_queries(stats)[[row_of[i] for i in chosen]]))
        columns += [(layer, index) for index in range(maxima[-1].shape[1])]
    sae_maxima = np.hstack(maxima)
    monitors = []
    for domain in (*SAFETY_DOMAINS, ANY):
        labels = task_labels(domains, domain)
        for monitor in (
            dense_probe(domain, features, labels, train, validation, config),
            ksparse_probe(domain, sae_maxima, columns, labels, train, validation, config),
        ):
            if monitor is not None:
                monitors.append(monitor.as_dict())
    write_json_atomic(ctx.out / "monitor.json", {"hook_kind": kind, "monitors": monitors})
    return {
        f"{m['method']}:{m['domain']}": (None if m["auroc_validation"] is None else round(m["auroc_validation"], 3))
        for m in monitors
    }


def load_monitors(folder: Path) -> dict:
    return json.loads((folder / "monitor.json").read_text())
