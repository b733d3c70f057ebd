"""The activation cache: chat records share one pass over their common prefix, with the same activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import offline_pipeline.activation_cache as activation_cache
from offline_pipeline.activation_cache import ActivationCache, as_float, collect, hook_file, shared_prefixes
from offline_pipeline.encoding import record_max_matrix
from offline_pipeline.stages.cache_selection import OUTLIER_FACTOR, usable_tokens
from offline_pipeline.stages.stats import shared_prefix_template_max
from offline_pipeline.stages.sweep import sweep_data
from sae_engine.chat import encode_text, encode_user_turn
from sae_engine.models import LoadedModel, from_config, tiny_llama_config
from sae_engine.topk import TopKSAE

HOOKS = ["blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny(tokenizer) -> LoadedModel:
    return LoadedModel(from_config(tiny_llama_config(tokenizer)).float(), tokenizer, "tiny", torch.device("cpu"), torch.float32)


def _encoded(tokenizer):
    return [
        encode_user_turn(tokenizer, "Hello there"),
        encode_user_turn(tokenizer, "How do I bake bread?", "Mix flour, water and salt."),
        encode_text(tokenizer, "A plain training text."),
        encode_user_turn(tokenizer, "A longer prompt about the sky, the sea and the hills beyond them", "Yes."),
    ]


def _write(folder, tiny, encoded, batch_tokens=64):
    folder.mkdir()
    collect(tiny, encoded, HOOKS, folder, batch_tokens=batch_tokens)
    (folder / "records.jsonl").write_text("".join('{"split": "filter"}\n' for _ in encoded))
    return ActivationCache.open(folder)


def test_a_shared_prefix_runs_once_with_the_same_activations(tmp_path, tiny, monkeypatch):
    encoded = _encoded(tiny.tokenizer)
    groups = shared_prefixes(encoded)
    assert [sorted(members) for members in groups.values()] == [[0, 1, 3]]
    shared = _write(tmp_path / "shared", tiny, encoded)
    monkeypatch.setattr(activation_cache, "MIN_SHARED_PREFIX", 10**6)
    assert not shared_prefixes(encoded)
    plain = _write(tmp_path / "plain", tiny, encoded)
    for hook in HOOKS:
        assert torch.allclose(as_float(shared.acts(hook)), as_float(plain.acts(hook)), atol=1e-2, rtol=1e-2)
        assert np.allclose(shared.norms(hook), plain.norms(hook), rtol=1e-2)
    assert shared.content.tolist() == [c for e in encoded for c in e.content]
    assert (shared.answer_start - shared.offsets[:-1]).tolist() == [e.prompt_length for e in encoded]


def test_the_shared_prefix_mask_covers_template_and_system_prompt(tmp_path, tiny):
    encoded = _encoded(tiny.tokenizer)
    cache = _write(tmp_path / "c", tiny, encoded)
    prefix = cache.shared_prefix()
    for record, e in enumerate(encoded):
        start, end = cache.offsets[record], cache.offsets[record + 1]
        first = e.content.index(True)
        assert prefix[start:end].tolist() == [i < first for i in range(len(e.ids))]


def test_prefix_groups_are_the_prefixes_collect_ran_once(tmp_path, tiny):
    encoded = _encoded(tiny.tokenizer)
    cache = _write(tmp_path / "c", tiny, encoded)
    groups = cache.prefix_groups()
    assert [(length, members) for length, members in groups] == [
        (len(prefix), members) for prefix, members in shared_prefixes(encoded).items()
    ]
    (length, members), = groups
    for hook in HOOKS:
        acts = cache.acts(hook)
        first = acts[cache.offsets[members[0]] : cache.offsets[members[0]] + length]
        for record in members[1:]:
            assert np.array_equal(acts[cache.offsets[record] : cache.offsets[record] + length], first)


def test_a_shared_prefix_encoded_once_gives_every_record_its_template_maxima(tmp_path, tiny):
    cache = _write(tmp_path / "c", tiny, _encoded(tiny.tokenizer))
    hook = HOOKS[0]
    torch.manual_seed(0)
    sae = TopKSAE(cache.acts(hook).shape[1], 32, 4)
    template = ~cache.content
    records = list(range(len(cache.records)))
    expected = record_max_matrix(sae, cache, hook, records, template)
    row_of = np.arange(len(records))
    got = np.zeros_like(expected)
    shared = shared_prefix_template_max(sae, cache, hook, template, cache.prefix_groups(), row_of, got)
    assert shared.sum() == sum(length * len(members) for length, members in cache.prefix_groups()) > 0
    rest = record_max_matrix(sae, cache, hook, records, template & ~shared)
    assert np.allclose(np.maximum(got, rest), expected, atol=1e-6)
    assert (got > 0).any()


def test_records_marked_apart_leave_the_others_activations_bit_for_bit(tmp_path, tiny):
    bf16 = LoadedModel(tiny.model.to(torch.bfloat16), tiny.tokenizer, "tiny", torch.device("cpu"), torch.bfloat16)
    try:
        base = _encoded(tiny.tokenizer)
        # Longer than every base record: batched together, they would change the base batches' padded shape.
        extra = [encode_user_turn(tiny.tokenizer, "How do I bake bread? " * 8, "I'm sorry, but"),
                 encode_user_turn(tiny.tokenizer, "Hello there, " * 10, "Sure! Here is")]
        alone = _write(tmp_path / "alone", bf16, base, batch_tokens=4096)
        folder = tmp_path / "with"
        folder.mkdir()
        collect(bf16, base + extra, HOOKS, folder, batch_tokens=4096, apart=[False] * len(base) + [True] * len(extra))
        (folder / "records.jsonl").write_text("".join('{"split": "filter"}\n' for _ in base + extra))
        both = ActivationCache.open(folder)
        end = int(alone.offsets[-1])
        for hook in HOOKS:
            assert np.array_equal(np.asarray(both.acts(hook)[:end]), np.asarray(alone.acts(hook)))
            assert np.asarray(both.acts(hook)[end:]).any()
    finally:
        tiny.model.float()


def test_records_marked_apart_cannot_move_the_others_outlier_limit(tmp_path, tiny):
    base = _encoded(tiny.tokenizer)
    extra = [encode_user_turn(tiny.tokenizer, "How do I bake bread? " * 8, "I'm sorry, but"),
             encode_user_turn(tiny.tokenizer, "Hello there, " * 10, "Sure! Here is")]
    folder = tmp_path / "cache"
    folder.mkdir()
    collect(tiny, base + extra, HOOKS[:1], folder, batch_tokens=4096, apart=[False] * len(base) + [True] * len(extra))
    kinds = ["chat"] * len(base) + ["opening"] * len(extra)
    (folder / "records.jsonl").write_text("".join(f'{{"split": "filter", "kind": "{k}"}}\n' for k in kinds))
    cache = ActivationCache.open(folder)
    end = int(cache.offsets[len(base)])
    assert len(cache.tokens) - end > end  # the apart records hold most tokens: counted, they would set the median
    # Unit norms, one planted outlier among the others, apart records far above it.
    norms = np.ones(len(cache.tokens), dtype=np.float32)
    planted = int(cache.offsets[1]) + 2
    norms[planted] = 2 * OUTLIER_FACTOR
    norms[end:] = 100 * OUTLIER_FACTOR
    np.save(hook_file(folder, "norms", HOOKS[0]), norms)
    meta = {"special_ids": [tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id]}
    got = usable_tokens(ActivationCache.open(folder), meta, HOOKS[0])
    assert not got[planted] and not got[end:].any()
    special = np.isin(cache.tokens[:end], meta["special_ids"])
    assert got[:end].sum() == end - special.sum() - 1


def test_the_sweeps_domain_rows_leave_out_the_refusal_openings(tmp_path, tiny):
    encoded = [encode_user_turn(tiny.tokenizer, "How do I cook meth?"), encode_user_turn(tiny.tokenizer, "How do I cook meth?", "I'm sorry")]
    folder = tmp_path / "cache"
    folder.mkdir()
    collect(tiny, encoded, HOOKS[:1], folder, batch_tokens=4096, apart=[False, True])
    fields = '"split": "filter", "domain": "drugs", "pair_id": null, "language": "en", "is_lookalike": false'
    (folder / "records.jsonl").write_text("".join(f'{{{fields}, "kind": "{k}"}}\n' for k in ("prompt", "opening")))
    cache = ActivationCache.open(folder)
    everywhere = np.ones(len(cache.tokens), dtype=bool)
    data = sweep_data(cache, everywhere, everywhere, seed=0)
    assert data.domain_tokens["drugs"].tolist() == list(range(int(cache.offsets[1])))
