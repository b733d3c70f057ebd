"""Known answers for the precision-recall joint filter."""

from dataclasses import replace

import numpy as np
import pytest

from offline_pipeline.candidate_filter import (
    FilterConfig,
    FilterPass,
    Pair,
    QueryLabel,
    artifact_rules,
    joint_filter,
    most_precise,
    precision_recall,
    refusal_passes,
    tagged_domains,
)
from offline_pipeline.stages.filter import _layer_filter, cover_blank_domains, layer_queries

LABELS = [
    QueryLabel("violence", "insult"),
    QueryLabel("violence", "insult"),
    QueryLabel("violence", "insult"),
    QueryLabel("violence", "insult"),
    QueryLabel("violence", "physical_violence"),
    QueryLabel("violence", "physical_violence"),
    QueryLabel("drugs", "drugs"),
    QueryLabel("drugs", "drugs"),
    QueryLabel(None, benign=True),
    QueryLabel(None, benign=True),
]
# Normalised query maxima, 10 queries x 4 features.
ACTS = np.array(
    [
        # f0: insult-only; f1: all violence; f2: fires everywhere; f3: drugs, also on one benign twin
        [0.9, 0.8, 0.5, 0.0],
        [0.7, 0.6, 0.5, 0.0],
        [0.6, 0.0, 0.5, 0.0],
        [0.1, 0.7, 0.5, 0.0],
        [0.0, 0.9, 0.5, 0.0],
        [0.0, 0.9, 0.5, 0.0],
        [0.0, 0.0, 0.5, 0.9],
        [0.0, 0.0, 0.5, 0.8],
        [0.0, 0.0, 0.5, 0.0],
        [0.0, 0.0, 0.5, 0.6],
    ]
)


def test_precision_recall_by_hand():
    fires = ACTS > 0.25
    insult = np.array([label.concept == "insult" for label in LABELS])
    precision, recall, hits = precision_recall(fires, insult)
    assert precision.tolist() == pytest.approx([1.0, 3 / 5, 4 / 10, 0.0])
    assert recall.tolist() == pytest.approx([3 / 4, 3 / 4, 1.0, 0.0])
    assert hits.tolist() == [3, 3, 4, 0]


def test_joint_filter_tags_concepts_and_domains():
    config = FilterConfig(tau=0.25, min_precision=0.65, min_recall=0.5, min_hits=2, negatives="all")
    passes = joint_filter(ACTS, LABELS, config)
    got = {(p.feature, p.domain, p.concept): (round(p.precision, 3), round(p.recall, 3)) for p in passes}
    # f0: insult precision 3/3, recall 3/4; violence precision 1, recall 3/6.
    # f1: violence precision 5/5, recall 5/6; insult precision 3/5 and physical_violence 2/5 fail.
    # f2 fires everywhere: violence precision 6/10 fails. f3: drugs precision 2/3 (one benign twin), recall 1.
    assert got == {
        (0, "violence", "insult"): (1.0, 0.75),
        (0, "violence", None): (1.0, 0.5),
        (1, "violence", None): (1.0, 0.833),
        (3, "drugs", "drugs"): (0.667, 1.0),
        (3, "drugs", None): (0.667, 1.0),
    }
    assert all(type(p.domain) is str and p.threshold == 0.25 for p in passes)
    assert tagged_domains(passes) == {0: ["violence"], 1: ["violence"], 3: ["drugs"]}
    # Looser precision lets the fires-everywhere feature through for the majority domain.
    loose = joint_filter(ACTS, LABELS, FilterConfig(tau=0.25, min_precision=0.6, min_recall=0.5, min_hits=2, negatives="all"))
    assert (2, "violence", None) in {(p.feature, p.domain, p.concept) for p in loose}
    assert (1, "violence", "insult") in {(p.feature, p.domain, p.concept) for p in loose}
    # A stricter precision drops f3 (it fires on a benign twin).
    strict = joint_filter(ACTS, LABELS, FilterConfig(tau=0.25, min_precision=0.7, min_recall=0.5, min_hits=2, negatives="all"))
    assert 3 not in tagged_domains(strict)
    # A higher tau changes what "fires" means: f0 then fires on 2 of 4 insults and 2 of 6 violence queries.
    high = joint_filter(ACTS, LABELS, FilterConfig(tau=0.65, min_precision=0.6, min_recall=0.5, min_hits=2, negatives="all"))
    assert {(p.feature, p.concept) for p in high if p.feature == 0} == {(0, "insult")}


def test_benign_population_ignores_other_safety_domains():
    labels = LABELS
    config = FilterConfig(tau=0.25, min_precision=0.65, min_recall=0.5, min_hits=2, negatives="benign")
    got = {(p.feature, p.domain, p.concept): (round(p.precision, 3), round(p.recall, 3)) for p in joint_filter(ACTS, labels, config)}
    # f2 fires everywhere: against violence + benign, precision 6/8; against drugs + benign 2/4.
    assert got[(2, "violence", None)] == (0.75, 1.0)
    assert (2, "drugs", None) not in got
    # f1 is now judged on insult + benign only: 3 of its 3 firings there are insults.
    assert got[(1, "violence", "insult")] == (1.0, 0.75)
    # f3's benign firing still counts against it: 2 of 3.
    assert got[(3, "drugs", "drugs")] == (0.667, 1.0)
    # A query neither safety nor benign is in no population.
    unlabelled = [*LABELS[:8], QueryLabel(None), QueryLabel(None)]
    got = {(p.feature, p.domain, p.concept): p.precision for p in joint_filter(ACTS, unlabelled, config)}
    assert got[(3, "drugs", "drugs")] == 1.0


def test_a_feature_that_fires_on_too_many_benign_queries_never_passes():
    config = FilterConfig(tau=0.25, min_precision=0.65, min_recall=0.5, min_hits=2, negatives="benign")
    before = {(p.feature, p.domain, p.concept) for p in joint_filter(ACTS, LABELS, config)}
    # f2 fires on both benign queries, f3 on one of the two; f0 and f1 on none.
    capped = {(p.feature, p.domain, p.concept) for p in joint_filter(ACTS, LABELS, replace(config, max_benign_share=0.5))}
    assert (2, "violence", None) in before and (3, "drugs", "drugs") in before
    assert capped == {key for key in before if key[0] != 2}
    strict = {(p.feature, p.domain, p.concept) for p in joint_filter(ACTS, LABELS, replace(config, max_benign_share=0.0))}
    assert strict == {key for key in before if key[0] in (0, 1)}


def test_balanced_precision_does_not_depend_on_how_many_benign_queries_there_are():
    config = FilterConfig(tau=0.25, min_precision=0.6, min_recall=0.5, min_hits=2, balanced=True)
    got = {(p.feature, p.domain, p.concept): round(p.precision, 3) for p in joint_filter(ACTS, LABELS, config)}
    # f3 fires on both drugs queries (recall 1) and on one of two benign ones (false-alarm rate 1/2): 1 / 1.5.
    assert got[(3, "drugs", "drugs")] == 0.667
    # Ten times the benign queries, with the same false-alarm rate: the same balanced precision,
    # where plain precision falls from 2/3 to 2/12.
    more = [*LABELS, *[QueryLabel(None, benign=True)] * 18]
    acts = np.vstack([ACTS, np.tile(ACTS[8:10], (9, 1))])
    again = {(p.feature, p.domain, p.concept): round(p.precision, 3) for p in joint_filter(acts, more, config)}
    assert again[(3, "drugs", "drugs")] == 0.667
    plain = {(p.feature, p.domain, p.concept) for p in joint_filter(acts, more, replace(config, balanced=False))}
    assert (3, "drugs", "drugs") not in plain


def test_bad_shapes_and_config_are_named():
    with pytest.raises(ValueError, match="query labels"):
        joint_filter(ACTS[:3], LABELS)
    with pytest.raises(ValueError, match="min_recall"):
        FilterConfig(min_recall=1.5)
    with pytest.raises(ValueError, match="negatives"):
        FilterConfig(negatives="some")
    with pytest.raises(ValueError, match="max_benign_share"):
        FilterConfig(max_benign_share=2.0)


def _pairs_case():
    """Queries 0-3 are concept queries with twins 4-7; 8-9 are benign chats."""
    labels = [QueryLabel("drugs", "drugs")] * 4 + [QueryLabel(None, benign=True)] * 6
    pairs = [Pair(i, i + 4, "drugs", "drugs") for i in range(4)]
    fires = np.zeros((10, 3), dtype=bool)
    fires[[0, 1, 2], 0] = True  # f0 separates three pairs
    fires[[0, 1, 2, 4, 5, 6], 1] = True  # f1 fires on query and twin alike: shared words
    fires[[0, 1, 2], 2] = True  # f2 separates them too, but fires on the template of a benign chat
    template = np.zeros((10, 3), dtype=bool)
    template[8, 2] = True
    benign = np.array([label.benign for label in labels])
    return labels, pairs, fires, template, benign


def test_a_pass_must_separate_its_pairs_and_stay_off_the_template():
    labels, pairs, fires, template, benign = _pairs_case()
    config = FilterConfig(tau=0.5, min_precision=0.0, min_recall=0.5, min_hits=2, min_pair_share=0.5, min_pair_hits=2,
                          max_template_share=0.1)
    passes = [FilterPass(f, "drugs", "drugs", 1.0, 0.75, 0.5) for f in range(3)]
    kept, rejected = artifact_rules(passes, fires, template, benign, pairs, config)
    assert [(p.feature, p.pair_share, p.template_share) for p in kept] == [(0, 0.75, 0.0)]
    assert {(r.feature, r.reason) for r in rejected} == {(1, "pairs"), (2, "template")}
    assert next(r for r in rejected if r.feature == 2).template_share == pytest.approx(1 / 6)
    # Without any pair of the concept the rule cannot hold: nothing passes.
    assert artifact_rules(passes, fires, template, benign, [], config)[0] == []


def test_refusal_passes_need_precision_over_refused_and_answered_prompts():
    refused = np.array([True, True, True, True, False, False, False, False])
    fires = np.zeros((8, 2), dtype=bool)
    fires[[0, 1, 2], 0] = True  # fires when the model is about to refuse
    fires[[0, 1, 4, 5, 6], 1] = True  # fires on refused and answered prompts alike
    config = FilterConfig(tau=0.5, min_precision=0.8, min_recall=0.5, min_hits=2)
    (only,) = refusal_passes(fires, refused, config)
    assert (only.feature, only.domain, only.concept, only.precision, only.recall) == (0, "refusal", None, 1.0, 0.75)
    # The pair rule does not apply to refusal; the template rule does.
    kept, _ = artifact_rules([only], fires, np.zeros_like(fires), np.ones(8, dtype=bool), [], config)
    assert kept and kept[0].pair_share is None


def test_the_filter_finds_refusal_features_on_the_answered_chats_not_on_the_prompts():
    records = [{**_record("drugs"), "refused": n % 2 == 0} for n in range(10)] + [_record("benign") for _ in range(10)]
    prompts = np.zeros((20, 3))
    prompts[[0, 2, 4, 6, 8], 2] = 2.0  # on the refused prompts' own words: not what the refusal rule reads
    answered = np.zeros((8, 3))
    answered[:4, 0] = 2.0  # on the four refused answers only
    answered[:, 1] = 2.0  # on every answer
    refused = np.array([True] * 4 + [False] * 4)
    config = FilterConfig(tau=1.0, min_precision=0.9, min_recall=0.5, min_hits=2)
    q = layer_queries(records, prompts, np.zeros_like(prompts), config.tau, answered, refused)
    kept, _ = _layer_filter(q, config)
    assert [(p.feature, p.precision, p.recall) for p in kept if p.domain == "refusal"] == [(0, 1.0, 1.0)]
    without = layer_queries(records, prompts, np.zeros_like(prompts), config.tau)
    assert [p for p in _layer_filter(without, config)[0] if p.domain == "refusal"] == []


def _record(domain: str, pair_id: str | None = None, twin: bool = False) -> dict:
    return {"domain": domain, "concept": "c" if domain != "benign" else None, "refused": None, "pair_id": pair_id,
            "language": "en", "is_lookalike": twin, "source": "test", "source_label": None}


def test_a_domain_blank_at_the_strict_precision_takes_its_features_at_the_fallback():
    records = [_record("drugs") for _ in range(20)] + [_record("hate") for _ in range(20)]
    for domain in ("drugs", "hate"):
        for n in range(4):
            records += [_record(domain, f"{domain}{n}"), {**_record("benign", f"{domain}{n}", twin=True), "concept": "c"}]
    records += [_record("benign") for _ in range(200)]
    domain = np.array([r["domain"] for r in records])
    twin = np.array([r["is_lookalike"] for r in records])
    plain_benign = np.flatnonzero((domain == "benign") & ~twin)
    acts = np.zeros((len(records), 3))
    acts[domain == "drugs", 0] = 2.0  # drugs, never on benign: precision 1
    acts[domain == "hate", 1] = 2.0  # hate, and on 10 of 208 benign queries: balanced precision 0.95
    acts[plain_benign[:10], 1] = 2.0
    acts[domain == "drugs", 2] = 2.0  # drugs again at 0.95: drugs is covered, so it stays out
    acts[plain_benign[10:20], 2] = 2.0
    strict = FilterConfig(tau=1.0, min_precision=0.97, min_recall=0.1, balanced=True)
    queries = {0: layer_queries(records, acts, np.zeros_like(acts), strict.tau)}

    outcome = {0: _layer_filter(queries[0], strict)}
    assert sorted(cover_blank_domains(queries, outcome, strict)) == ["hate", "politics", "pornography", "self_harm", "terror", "violence"]
    assert {(p.feature, p.domain) for p in outcome[0][0]} == {(0, "drugs")}

    fallback = replace(strict, fallback_precision=0.9)
    outcome = {0: _layer_filter(queries[0], fallback)}
    cover_blank_domains(queries, outcome, fallback)
    passes = {(p.feature, p.domain) for p in outcome[0][0]}
    assert passes == {(0, "drugs"), (1, "hate")}
    assert all(0.9 <= p.precision < 0.97 for p in outcome[0][0] if p.domain == "hate")


def test_each_domain_keeps_its_most_precise_features():
    passes = {
        0: [FilterPass(1, "drugs", None, 0.99, 0.2, 1.0), FilterPass(2, "drugs", None, 0.95, 0.9, 1.0),
            FilterPass(2, "drugs", "c", 0.999, 0.1, 1.0), FilterPass(3, "hate", None, 0.5, 0.1, 1.0)],
        5: [FilterPass(1, "drugs", None, 0.99, 0.3, 1.0), FilterPass(4, "drugs", None, 0.9, 0.9, 1.0)],
    }
    kept = most_precise(passes, 2)
    # (0, 2) ranks by its best pass (the concept's 0.999) and keeps both its passes; (5, 1) beats (0, 1) on recall.
    assert {(layer, p.feature, p.concept) for layer, items in kept.items() for p in items if p.domain == "drugs"} == {
        (0, 2, None), (0, 2, "c"), (5, 1, None)}
    assert [p.feature for p in kept[0] if p.domain == "hate"] == [3]
    with pytest.raises(ValueError, match="max_per_domain"):
        FilterConfig(max_per_domain=0)
