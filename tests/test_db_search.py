"""Full-text search over explanations on SQLite (FTS5) and PostgreSQL (GIN tsvector): it finds words and
prefixes, follows inserts/updates/deletes, filters by SAE set, pages, and treats hostile input as text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from starmap.db import (
    Explanation,
    Feature,
    Model,
    Sae,
    SaeSet,
    make_engine,
    make_sessionmaker,
    migrate,
)
from starmap.db.search import fts5_query, query_words, search_explanations
from tests.postgres import postgres_server  # noqa: F401  (fixture)

EXPLANATIONS = {
    ("a", 0): "Terms related to explosives and weapons, such as bombs.",
    ("a", 1): "Violent verbs describing physical assault.",
    ("a", 2): "Punctuation at the start of a line.",
    ("a", 3): "与暴力和非法活动相关的术语",
    ("a", 4): "Café names with diacritics, naïve résumé.",
    ("b", 0): "Weapons trade and arms smuggling.",
}
HOSTILE = [
    '"',
    "'",
    "'); DROP TABLE explanations; --",
    "*",
    "NEAR(",
    "NEAR(weapons",
    "weapons NOT",
    "AND",
    "OR OR",
    "^",
    ":",
    "text:weapons",
    "{text}: weapons",
    "-weapons",
    "weap*ons",
    "\\",
    "\x00",
    "🙂💣",
    "ẞ ǅ ﬁ",
    "",
    "   ",
    "_",
    "__init__ a_b",
    "x" * 5000,
]


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request, tmp_path: Path) -> Iterator[Session]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'search.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        model = Model(name="m", n_layers=4, d_model=8)
        sets = {
            name: SaeSet(model=model, name=name, hook_kind="mlp_out", k=4, expansion=2, d_sae=16, origin="pipeline")
            for name in ("a", "b")
        }
        for (set_name, index), explanation in EXPLANATIONS.items():
            sae_set = sets[set_name]
            sae = next((s for s in sae_set.saes), None) or Sae(
                sae_set=sae_set, layer=2, hook_name="blocks.2.hook_mlp_out"
            )
            session.add(sae)
            session.flush()
            feature = Feature(sae=sae, sae_set_id=sae_set.id, layer=2, index=index, feature_id=f"2_{index}")
            feature.explanations.append(Explanation(text=explanation, language="en", explainer="llm"))
            session.add(feature)
        session.commit()
        yield session
    engine.dispose()


def set_id(session: Session, name: str) -> int:
    return session.scalar(select(SaeSet.id).where(SaeSet.name == name))


def texts(hits) -> set[str]:
    return {hit.text for hit in hits}


def test_finds_words_prefixes_and_requires_every_word(session: Session) -> None:
    assert texts(search_explanations(session, "weapons")) == {EXPLANATIONS["a", 0], EXPLANATIONS["b", 0]}
    assert texts(search_explanations(session, "WEAP")) == {EXPLANATIONS["a", 0], EXPLANATIONS["b", 0]}
    assert texts(search_explanations(session, "weapons smuggling")) == {EXPLANATIONS["b", 0]}
    assert texts(search_explanations(session, "smuggling weapons")) == {EXPLANATIONS["b", 0]}
    assert search_explanations(session, "weapons punctuation") == []
    # Han runs are matched as substrings: neither index splits unspaced scripts into words.
    assert texts(search_explanations(session, "暴力")) == {EXPLANATIONS["a", 3]}
    assert texts(search_explanations(session, "非法 暴力")) == {EXPLANATIONS["a", 3]}
    assert search_explanations(session, "暴力 weapons") == []


def test_hits_carry_their_feature(session: Session) -> None:
    [hit] = search_explanations(session, "assault")
    assert (hit.feature_id, hit.layer, hit.language) == ("2_1", 2, "en")
    assert hit.sae_set_id == set_id(session, "a")
    assert session.get(Feature, hit.feature_pk).feature_id == "2_1"


def test_filters_by_sae_set_and_pages(session: Session) -> None:
    [hit] = search_explanations(session, "weapons", sae_set_id=set_id(session, "b"))
    assert hit.text == EXPLANATIONS["b", 0]
    first = search_explanations(session, "weapons", limit=1)
    second = search_explanations(session, "weapons", limit=1, offset=1)
    assert len(first) == len(second) == 1
    assert texts(first) | texts(second) == {EXPLANATIONS["a", 0], EXPLANATIONS["b", 0]}
    assert search_explanations(session, "weapons", limit=0) == []


def test_follows_updates_and_deletes(session: Session) -> None:
    explanation = session.scalar(select(Explanation).where(Explanation.text == EXPLANATIONS["a", 2]))
    explanation.text = "Chemical precursors of nerve agents."
    session.commit()
    assert search_explanations(session, "punctuation") == []
    assert [hit.explanation_id for hit in search_explanations(session, "nerve agents")] == [explanation.id]

    session.delete(explanation)
    session.commit()
    assert search_explanations(session, "nerve") == []


@pytest.mark.parametrize("query", HOSTILE, ids=lambda query: ascii(query)[:24])
def test_hostile_queries_are_only_text(session: Session, query: str) -> None:
    tables_before = set(inspect(session.get_bind()).get_table_names())
    hits = search_explanations(session, query)
    words = query_words(query)
    for hit in hits:  # every hit contains every word of the query (as a word prefix, any case)
        assert all(word.casefold()[:2] in hit.text.casefold() for word in words), (query, hit.text)
    assert set(inspect(session.get_bind()).get_table_names()) == tables_before
    assert session.scalar(select(func.count()).select_from(Explanation)) == len(EXPLANATIONS)


def test_operator_words_are_searched_as_words(session: Session) -> None:
    # FTS5 would read bare NOT / NEAR as operators; here they are ordinary (absent) words.
    assert search_explanations(session, "weapons NOT") == []
    assert search_explanations(session, "NEAR(weapons") == []
    assert texts(search_explanations(session, "-weapons")) == {EXPLANATIONS["a", 0], EXPLANATIONS["b", 0]}


def test_fts5_query_quotes_every_word() -> None:
    assert query_words('say "hi" NEAR(x, *y) hi') == ["say", "hi", "NEAR", "x", "y"]
    assert fts5_query(["say", "NEAR"]) == '"say"* "NEAR"*'
    assert query_words("'); DROP TABLE x; --") == ["DROP", "TABLE", "x"]
