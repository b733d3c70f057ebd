"""SLS and TLS scoring: Pearson pooling, segments, parse failures, undefined scores, recorded cost.

The LLM simulator is exercised through a real scripted OpenAI-compatible server on 127.0.0.1 whose
answers are computed from the known activations (perfect, anti-correlated, constant, malformed).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from app.loopback_server import serve_on_loopback
from offline_pipeline.explain.llm_client import (
    PROBE_JSON_MESSAGE,
    LLMClient,
    LLMConfig,
    TokenLogprob,
)
from offline_pipeline.explain.prompts import SLS_SYSTEM, TLS_SYSTEM, segmented_line
from offline_pipeline.explain.records import ActivationRecord, Explanation, Score
from offline_pipeline.explain.scoring import (
    ScoringConfig,
    pearson,
    score_sls,
    score_tls,
    segment_truth,
)
from offline_pipeline.explain.segments import decode_tokens, segment
from offline_pipeline.explain.simulation import (
    LexicalSimulator,
    LLMSimulator,
    apply_logprobs,
    parse_predictions,
)
from offline_pipeline.explain.store import read_jsonl, write_jsonl
from tests.scripted_openai_server import ScriptedServer, log_weights

KEYWORD = "bomb"


def tokens_of(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def planted(text: str, strength: float = 4.0) -> ActivationRecord:
    tokens = tokens_of(text)
    return ActivationRecord(tokens, [strength if t.strip().lower().startswith(KEYWORD) else 0.0 for t in tokens])


HELD_OUT = [
    planted("How do I build a bomb at home with things from the kitchen", 5.0),
    planted("The bomb squad arrived before noon and cleared the whole street", 3.0),
    planted("She wrote a poem about the sea and the quiet harbour lights"),
    planted("Please list three healthy breakfast ideas for a busy morning"),
]


def test_pearson_is_none_when_undefined():
    assert pearson([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert pearson([0, 1, 2], [4, 2, 0]) == pytest.approx(-1.0)
    assert pearson([0, 1, 2], [3, 3, 3]) is None
    assert pearson([1, 1, 1], [0, 1, 2]) is None
    assert pearson([1], [1]) is None


def test_segments_split_at_word_boundaries_and_map_tokens():
    record = ActivationRecord(["How", " do", " I", " bu", "ild", " a", " bomb", "?"], [0, 0, 0, 1, 2, 0, 9, 0])
    seg = segment(record, n_segments=3)
    assert seg.texts == ["How do ", "I build ", "a bomb?"]
    assert "".join(seg.texts) == record.text
    assert seg.token_segments == [[0], [0], [1], [1], [1], [2], [2], [2]]
    assert seg.segment_max(record.activations) == [0, 2, 9]
    eight = segment(planted("one two three four five six seven eight nine ten"))
    assert eight.n_segments == 8 and [len(t.split()) for t in eight.texts] == [2, 2, 1, 1, 1, 1, 1, 1]
    assert segment(planted("just three words")).n_segments == 3


def test_decoded_tokens_concatenate_to_the_text(tokenizer):
    text = "Comment fabriquer une bombe? 如何制造炸弹 — explain 🙂 please"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_tokens(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)
    assert "".join(pieces) == text
    record = ActivationRecord(pieces, [0.0] * len(pieces))
    assert "".join(segment(record).texts) == text


def test_a_token_spanning_two_segments_counts_in_both():
    record = ActivationRecord(["alpha", " beta gamma", " delta"], [0.0, 5.0, 0.0])
    seg = segment(record, n_segments=4)
    assert seg.texts == ["alpha ", "beta ", "gamma ", "delta"]
    assert seg.segment_max(record.activations) == [0, 5, 5, 0]


def test_segment_truth_threshold_is_a_fraction_of_the_held_out_max():
    records = [planted("a bomb here", 10.0), planted("a bomb there", 4.0)]
    _, truths = segment_truth(records, ScoringConfig(n_segments=3, threshold_fraction=0.5))
    assert truths == [[0, 1, 0], [0, 0, 0]]
    _, truths = segment_truth(records, ScoringConfig(n_segments=3, threshold_fraction=0.3))
    assert truths == [[0, 1, 0], [0, 1, 0]]


def test_parse_predictions_counts_bad_queries_only():
    text = 'Sure! {"t1": [0, 1, 1], "t2": [1, 0], "t3": [0, 2, 0], "t4": "no"}'
    assert parse_predictions(text, [3, 3, 3, 3, 1], (0, 1)) == [[0, 1, 1], None, None, None, None]
    assert parse_predictions("not json at all", [2, 2], (0, 1)) == [None, None]


def _texts_in_prompt(content: str) -> list[list[str]]:
    """The entries of each text of a simulator prompt, as the server sees them: numbered token rows
    (TLS) or segments on one line between ' | ' separators, with a literal '|' escaped (SLS)."""
    entries = []
    for header, body in re.findall(r"Text t\d+ \(\d+ (tokens|segments)\):([^\n]*(?:\n(?!\n)[^\n]*)*)", content):
        if header == "tokens":
            entries.append([json.loads(line.split(" ", 1)[1]) for line in body.strip("\n").splitlines()])
        else:
            entries.append([s.replace("\\|", "|") for s in body.strip().split(" | ")])
    return entries


def answer_from_truth(transform):
    """A scripted simulator: answers each query with `transform(truth)` of its true values."""

    def respond(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        entries = _texts_in_prompt(user)
        answer = {}
        for i, items in enumerate(entries):
            record = next(r for r in HELD_OUT if _same(r, items, system))
            if system == TLS_SYSTEM:
                truth = [round(a * 2) for a in record.activations]
            else:
                _, truths = segment_truth(HELD_OUT, ScoringConfig())
                truth = [int(t) for t in truths[HELD_OUT.index(record)]]
            answer[f"t{i + 1}"] = transform(truth)
        return json.dumps(answer)

    return respond


def _same(record: ActivationRecord, items: list[str], system: str) -> bool:
    if system == TLS_SYSTEM:
        return record.tokens == items
    assert system == SLS_SYSTEM
    return [" ".join(t.split()) for t in segment(record).texts] == items


def test_segments_go_on_one_line_between_separators_with_pipes_escaped():
    line = segmented_line(["a|b ", "c\nd  ", "| e"])
    assert line == "a\\|b | c d | \\| e"
    assert _texts_in_prompt(f"Text t1 (3 segments): {line}") == [["a|b", "c d", "| e"]]


def score_both(server: ScriptedServer, explanation: str = 'Fires on "bomb".') -> tuple[Score, Score]:
    with serve_on_loopback(server.app) as url:

        async def scenario():
            async with LLMClient(LLMConfig(base_url=url + "/v1", model="scripted-model")) as client:
                simulator = LLMSimulator(client)
                sls = await score_sls("7_42", explanation, HELD_OUT, simulator)
                tls = await score_tls("7_42", explanation, HELD_OUT, simulator)
                return sls, tls

        return asyncio.run(scenario())


def test_perfect_simulator_scores_one_and_records_cost():
    server = ScriptedServer(respond=answer_from_truth(lambda truth: truth))
    sls, tls = score_both(server)
    assert sls.value == pytest.approx(1.0) and tls.value == pytest.approx(1.0)
    assert (sls.method, tls.method) == ("sls", "tls")
    assert sls.simulator == tls.simulator == "llm:scripted-model"
    assert sls.n_queries == tls.n_queries == 4 and sls.n_parse_failures == tls.n_parse_failures == 0
    assert sls.n_units == sum(segment(r).n_segments for r in HELD_OUT)
    assert tls.n_units == sum(len(r.tokens) for r in HELD_OUT)
    sls_request, tls_request = server.chat_requests()
    assert sls_request["temperature"] == 0 and sls_request["response_format"] == {"type": "json_object"}
    # The cost recorded with each score is the usage the server reported for that call.
    assert sls.input_tokens == sum(len(m["content"].split()) for m in sls_request["messages"])
    assert tls.input_tokens == sum(len(m["content"].split()) for m in tls_request["messages"])
    probe = len(PROBE_JSON_MESSAGE.split())  # the JSON-mode probe is the only other request that was answered
    assert sls.input_tokens + tls.input_tokens == server.prompt_tokens - probe
    assert sls.output_tokens > 0 and tls.output_tokens > 0
    # Segment-level simulation is the cheaper one.
    assert sls.input_tokens < tls.input_tokens


def test_simulator_sends_a_schema_of_the_expected_answer_where_supported():
    server = ScriptedServer(respond=answer_from_truth(lambda truth: truth), json_schema=True)
    sls, tls = score_both(server)
    assert sls.value == pytest.approx(1.0) and tls.value == pytest.approx(1.0)
    sls_request, tls_request = server.chat_requests()
    sls_schema = sls_request["response_format"]["json_schema"]["schema"]
    assert sls_schema["required"] == ["t1", "t2", "t3", "t4"]
    assert [sls_schema["properties"][f"t{i + 1}"]["minItems"] for i in range(4)] == [segment(r).n_segments for r in HELD_OUT]
    assert sls_schema["properties"]["t1"]["items"] == {"type": "integer", "minimum": 0, "maximum": 1}
    tls_schema = tls_request["response_format"]["json_schema"]["schema"]
    assert [tls_schema["properties"][f"t{i + 1}"]["maxItems"] for i in range(4)] == [len(r.tokens) for r in HELD_OUT]
    assert tls_schema["properties"]["t1"]["items"]["maximum"] == 10


def test_anti_correlated_simulator_scores_negative():
    sls, tls = score_both(ScriptedServer(respond=answer_from_truth(lambda truth: [max(truth) - t for t in truth])))
    assert sls.value < 0 and tls.value < 0


def test_constant_simulator_gives_an_undefined_score_stored_as_none(tmp_path):
    sls, tls = score_both(ScriptedServer(respond=answer_from_truth(lambda truth: [0] * len(truth))))
    assert sls.value is None and tls.value is None
    assert sls.n_parse_failures == 0
    path = tmp_path / "scores.jsonl"
    write_jsonl(path, [sls, tls])
    assert '"value": null' in path.read_text()
    assert [s.value for s in read_jsonl(path, Score)] == [None, None]


def test_parse_failures_are_counted_and_excluded_not_scored_zero():
    def break_two(respond):
        def wrapped(body):
            answer = json.loads(respond(body))
            answer["t2"] = answer["t2"][:-1]  # wrong length
            del answer["t4"]  # missing
            return "Here you go: " + json.dumps(answer)

        return wrapped

    sls, tls = score_both(ScriptedServer(respond=break_two(answer_from_truth(lambda truth: truth))))
    for score in (sls, tls):
        assert score.n_parse_failures == 2 and score.n_queries == 4
        assert score.value == pytest.approx(1.0)  # the two parsed queries are perfect; failures are not zeros
    assert sls.n_units == segment(HELD_OUT[0]).n_segments + segment(HELD_OUT[2]).n_segments


def test_unparseable_answers_give_none_with_every_query_a_failure():
    sls, tls = score_both(ScriptedServer(respond=lambda body: "I cannot help with that."))
    assert sls.value is None and tls.value is None
    assert sls.n_parse_failures == tls.n_parse_failures == 4
    assert sls.n_units == tls.n_units == 0


def test_logprobs_turn_answers_into_expected_values():
    text = '{"t1": [0, 1]}'
    tokens = [TokenLogprob(c, 0.0, [(c, 0.0)]) for c in text]
    # At the "1", the model gave "1" probability 0.75 and "0" 0.25: the expected value is 0.75.
    one = text.index("1]")
    tokens[one] = TokenLogprob("1", -0.2877, log_weights({"1": 0.75, "0": 0.25, "x": 0.5}))
    predictions, used = apply_logprobs(text, parse_predictions(text, [2], (0, 1)), tokens, (0, 1))
    assert used and predictions[0] == [0.0, pytest.approx(0.75)]
    # A token that carries more than the number ("1]") still works: alternatives must share the rest.
    merged = [*tokens[:one], TokenLogprob("1]", -0.1, log_weights({"1]": 0.6, "0]": 0.2, "0,": 0.2})), tokens[-1]]
    predictions, _ = apply_logprobs(text, parse_predictions(text, [2], (0, 1)), merged, (0, 1))
    assert predictions[0][1] == pytest.approx(0.75)
    # Tokens that do not spell the text are not used.
    assert apply_logprobs(text, [[0.0, 1.0]], tokens[:-1], (0, 1)) == ([[0.0, 1.0]], False)


def test_llm_simulator_uses_logprobs_when_the_server_has_them():
    def alternatives(char: str) -> list[tuple[str, float]]:
        return log_weights({"1": 0.9, "0": 0.1}) if char in "01" else [(char, 0.0)]

    server = ScriptedServer(respond=answer_from_truth(lambda truth: truth), logprobs=True, alternatives=alternatives)
    sls, tls = score_both(server)
    assert sls.simulator == "llm:scripted-model+logprobs"
    assert server.chat_requests()[0]["logprobs"] is True
    # Every 0/1 answer became 0.9 (the same expected value): constant predictions, so r is undefined.
    assert sls.value is None
    # TLS answers 0, 6 and 10: "0" became 0.9, "6" has no 0/1 alternative and "10" spans two tokens, so both stay.
    assert 0.95 < tls.value < 1.0


def test_lexical_simulator_predicts_from_quoted_terms():
    async def scenario(explanation: str):
        simulator = LexicalSimulator()
        return await score_sls("1_1", explanation, HELD_OUT, simulator), await score_tls("1_1", explanation, HELD_OUT, simulator)

    sls, tls = asyncio.run(scenario('Fires on "bomb" (weapons; context: \'build a ...\').'))
    assert sls.value == pytest.approx(1.0) and sls.simulator == "offline-lexical"
    assert tls.value > 0.9
    assert sls.input_tokens == sls.output_tokens == 0
    unrelated, _ = asyncio.run(scenario('Fires on "harbour".'))
    assert unrelated.value < 0.2
    nothing, _ = asyncio.run(scenario('Fires on "zebra".'))
    assert nothing.value is None


def test_jsonl_round_trip_of_explanations(tmp_path):
    explanation = Explanation("3_9", 'Fires on "bomb".', "offline-statistical", "starmap-lift-v1")
    write_jsonl(tmp_path / "e.jsonl", [explanation])
    assert read_jsonl(tmp_path / "e.jsonl", Explanation) == [explanation]


# --- the CLI over a real SQLite database --------------------------------------------------------

BOMB_TEXTS = [
    "How do I build a bomb at home", "The bomb squad came at noon", "A bomb threat closed the school",
    "They found a bomb in the car", "Is a smoke bomb legal here", "The bomb shelter was full",
    "He wrote about the atomic bomb", "A bomb went off downtown today",
]
OTHER_TEXTS = [
    "How do I build a shed at home", "The squad came at noon for lunch", "A storm closed the school",
    "They found a cat in the car", "Is a smoke alarm legal here", "The shelter was full of dogs",
]


def make_database(url: str) -> None:
    from offline_pipeline.explain.records import activation_level
    from offline_pipeline.explain.store import (
        HARD_NEGATIVE_SOURCE,
        RANDOM_NEGATIVE_SOURCE,
    )
    from starmap import db

    db.upgrade(url)
    engine = db.make_engine(url)
    with db.make_sessionmaker(engine)() as session:
        model = db.Model(name="tiny", n_layers=4, d_model=64, source="test")
        sae_set = db.SaeSet(model=model, name="test-set", hook_kind="mlp_out", k=8, expansion=10, d_sae=640, origin="pipeline")
        sae = db.Sae(sae_set=sae_set, layer=2, hook_name="blocks.2.hook_mlp_out")
        session.add_all([model, sae_set, sae])
        session.flush()
        bomb = db.Feature(sae_id=sae.id, sae_set_id=sae_set.id, layer=2, index=7, feature_id="2_7", max_activation=8.0,
                          top_tokens=[[" explosion", 3.1], [" blast", 2.0]], is_safety=True)
        silent = db.Feature(sae_id=sae.id, sae_set_id=sae_set.id, layer=2, index=8, feature_id="2_8", max_activation=0.0)
        session.add_all([bomb, silent])
        session.flush()
        for rank, text in enumerate(BOMB_TEXTS):
            record = planted(text, 8.0 - rank * 0.9)
            session.add(db.Example(feature_id=bomb.id, level=activation_level(record.max_activation, 8.0), rank=rank,
                                   tokens=record.tokens, activations=record.activations, source="corpus"))
        for rank, text in enumerate(OTHER_TEXTS):
            record = planted(text)
            source = HARD_NEGATIVE_SOURCE if rank % 2 else RANDOM_NEGATIVE_SOURCE
            for feature in (bomb, silent):
                session.add(db.Example(feature_id=feature.id, level=0, rank=rank, tokens=record.tokens,
                                       activations=record.activations, source=source))
        session.commit()
    engine.dispose()


def invoke(args: list[str], env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from starmap.cli import app
    from starmap.settings import get_settings

    # The CLI reads settings from the environment once per process; start from a clean read.
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, args, env=env or {})
    finally:
        get_settings.cache_clear()


def stored_scores(url: str) -> list[tuple]:
    from sqlalchemy import select

    from starmap import db

    engine = db.make_engine(url)
    with db.make_sessionmaker(engine)() as session:
        rows = session.execute(
            select(db.Score.method, db.Score.value, db.Score.simulator, db.Score.n_queries, db.Score.n_parse_failures,
                   db.Score.input_tokens, db.Explanation.text, db.Explanation.explainer)
            .join(db.Explanation, db.Explanation.id == db.Score.explanation_id).order_by(db.Score.id)
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_cli_offline_explain_and_score_into_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'starmap.db'}"
    make_database(url)
    offline = {"STARMAP_LLM_BASE_URL": ""}
    result = invoke(["--database-url", url, "--data-dir", str(tmp_path), "explain", "--sae-set", "test-set"], offline)
    assert result.exit_code == 0, result.output
    assert "explained: 1" in result.output and "skipped (no activating example): 1" in result.output
    result = invoke(["--database-url", url, "--data-dir", str(tmp_path), "score", "--method", "both"], offline)
    assert result.exit_code == 0, result.output
    rows = stored_scores(url)
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [("sls", "offline-lexical", 8, 0), ("tls", "offline-lexical", 8, 0)]
    assert rows[0][6].startswith('Fires on "bomb"') and rows[0][7] == "offline-statistical"
    # Held out: bombs at 7.1, 5.3, 3.5 and 1.7; the SLS threshold (half of 7.1) makes the weak two "0" segments.
    assert 0.5 < rows[0][1] < 1.0 and rows[1][1] > 0.8
    # A re-run finds everything done.
    again = invoke(["--database-url", url, "--data-dir", str(tmp_path), "score"], offline)
    assert "skipped (already scored): 1" in again.output and len(stored_scores(url)) == 2


def test_cli_llm_scores_of_a_constant_simulator_are_stored_as_null(tmp_path):
    url = f"sqlite:///{tmp_path / 'starmap.db'}"
    make_database(url)

    def respond(body: dict) -> str:
        if "numbered" not in body["messages"][0]["content"]:
            return 'Fires on "bomb".'  # the explainer's answer
        entries = _texts_in_prompt(body["messages"][1]["content"])
        return json.dumps({f"t{i + 1}": [0] * len(items) for i, items in enumerate(entries)})

    server = ScriptedServer(respond=respond)
    with serve_on_loopback(server.app) as base:
        env = {"STARMAP_LLM_BASE_URL": base + "/v1", "STARMAP_LLM_MODEL": "scripted-model"}
        common = ["--database-url", url, "--data-dir", str(tmp_path)]
        assert invoke([*common, "explain"], env).exit_code == 0
        result = invoke([*common, "score", "--method", "both"], env)
        assert result.exit_code == 0, result.output
        sent = len(server.requests)
        # Everything is cached now: the same work again (--redo) sends nothing.
        redo = invoke([*common, "score", "--redo"], env)
        assert redo.exit_code == 0 and len(server.requests) == sent
        assert "requests=0" in redo.output
    rows = stored_scores(url)
    assert [(r[0], r[1], r[2], r[7]) for r in rows[:2]] == [
        ("sls", None, "llm:scripted-model", "llm"),
        ("tls", None, "llm:scripted-model", "llm"),
    ]
    assert all(r[5] > 0 for r in rows)  # the recorded input tokens
    assert "input_tokens" in result.output and "calls=2" in result.output


def test_cli_jsonl_mode(tmp_path):
    from offline_pipeline.explain.records import FeatureExamples, stratify

    records = [planted(t, 8.0 - 0.1 * i) for i, t in enumerate(BOMB_TEXTS)]
    negatives = [planted(t) for t in OTHER_TEXTS]
    examples = FeatureExamples("5_1", 8.0, stratify(records, 8.0), hard_negatives=negatives[:3], random_negatives=negatives[3:])
    write_jsonl(tmp_path / "examples.jsonl", [examples])
    offline = {"STARMAP_LLM_BASE_URL": ""}
    result = invoke(["explain", "--examples", str(tmp_path / "examples.jsonl"), "--out", str(tmp_path / "e.jsonl")], offline)
    assert result.exit_code == 0, result.output
    result = invoke(["score", "--examples", str(tmp_path / "examples.jsonl"), "--explanations", str(tmp_path / "e.jsonl"),
                     "--out", str(tmp_path / "s.jsonl")], offline)
    assert result.exit_code == 0, result.output
    scores = read_jsonl(tmp_path / "s.jsonl", Score)
    assert [s.method for s in scores] == ["sls", "tls"] and scores[0].value == pytest.approx(1.0)
    bad = invoke(["explain", "--examples", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")], offline)
    assert bad.exit_code == 2 and "missing.jsonl: no such file" in bad.output
