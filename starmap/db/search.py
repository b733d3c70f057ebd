"""Full-text search over explanations, on SQLite (FTS5) and PostgreSQL (tsvector + GIN).

The user's text never reaches the SQL: it is cut into words, each word becomes a quoted prefix term
(every word must match, in any order), and the resulting query string is bound as a parameter.
Words are runs of letters/digits, so a query such as `"`, `*`, `NEAR(`, `AND` or `'); DROP TABLE`
is just words or nothing.

Chinese and Japanese are written without spaces, and neither index splits them into words (a whole
run of Han/kana characters is one token), so a Han/kana run in the query is matched as a substring
of the text instead (`LIKE`, a scan when the query has no other word to narrow it through the index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import (
    Select,
    bindparam,
    column,
    desc,
    func,
    literal_column,
    select,
    table,
)
from sqlalchemy.orm import Session

from starmap.db.models import Explanation, Feature

MAX_TERMS = 16
RANKED_MATCH_LIMIT = 2000
_WORD = re.compile(r"\w+")
# Han (with extensions and compatibility ideographs) and kana: scripts without spaces between words.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")


@dataclass(frozen=True)
class ExplanationHit:
    explanation_id: int
    feature_pk: int
    feature_id: str
    sae_set_id: int
    layer: int
    language: str
    text: str


def query_words(query: str) -> list[str]:
    """The words of a user query, in order, without duplicates (at most MAX_TERMS)."""
    return list(dict.fromkeys(_WORD.findall(query)))[:MAX_TERMS]


def split_terms(words: list[str]) -> tuple[list[str], list[str]]:
    """(words for the full-text index, Han/kana runs to match as substrings)."""
    indexed: list[str] = []
    substrings: list[str] = []
    for word in words:
        substrings.extend(_UNSPACED.findall(word))
        indexed.extend(part for part in _UNSPACED.split(word) if part)
    return list(dict.fromkeys(indexed)), list(dict.fromkeys(substrings))


def _is_prefix(word: str) -> bool:
    # A one-character prefix matches nearly every text: such a word must match whole.
    return len(word) > 1


def fts5_query(words: list[str]) -> str:
    """An FTS5 MATCH expression: each word a quoted phrase with a prefix star, implicitly ANDed."""
    return " ".join('"' + word.replace('"', '""') + '"' + ("*" if _is_prefix(word) else "") for word in words)


def tsquery(words: list[str]) -> str:
    """A PostgreSQL to_tsquery expression: each word a prefix lexeme, ANDed."""
    return " & ".join(word + (":*" if _is_prefix(word) else "") for word in words)


def search_explanations(
    session: Session, query: str, limit: int = 20, offset: int = 0, sae_set_id: int | None = None
) -> list[ExplanationHit]:
    """Explanations matching every word of `query` (as a word prefix): the best matches first when at most
    RANKED_MATCH_LIMIT texts match, else (a query of very common words) in id order."""
    words, substrings = split_terms(query_words(query))
    if not (words or substrings) or limit <= 0:
        return []
    dialect = session.get_bind().dialect.name
    if not words:
        search = _Search(_hit_columns(), None, [], [Explanation.id])
    elif dialect == "sqlite":
        search = _sqlite_search(words)
    elif dialect == "postgresql":
        search = _postgres_search(words)
    else:
        raise NotImplementedError(f"full-text search supports SQLite and PostgreSQL, not {dialect}")
    statement = search.statement
    for substring in substrings:
        statement = statement.where(Explanation.text.contains(substring, autoescape=True))
    if sae_set_id is not None:
        statement = statement.where(Feature.sae_set_id == sae_set_id)
    # Relevance needs a score for every match; past a few thousand matches that costs more than it tells.
    ranked = search.index_matches is not None and session.scalar(search.index_matches) <= RANKED_MATCH_LIMIT
    statement = statement.order_by(*(search.ranked_order if ranked else search.id_order))
    return [ExplanationHit(*row) for row in session.execute(statement.limit(limit).offset(offset))]


@dataclass(frozen=True)
class _Search:
    statement: Select
    index_matches: Select | None  # counts the texts the index matches
    ranked_order: list
    id_order: list


def _hit_columns() -> Select:
    return select(
        Explanation.id,
        Explanation.feature_id,
        Feature.feature_id,
        Feature.sae_set_id,
        Feature.layer,
        Explanation.language,
        Explanation.text,
    ).join(Feature, Feature.id == Explanation.feature_id)


# The FTS5 table made by the migration; its hidden column of the same name is the MATCH target.
_FTS = table("explanations_fts", column("rowid"), column("rank"), column("explanations_fts"))


def _sqlite_search(words: list[str]) -> _Search:
    match = _FTS.c.explanations_fts.op("MATCH")(bindparam("fts_query", fts5_query(words)))
    return _Search(
        statement=_hit_columns().join(_FTS, _FTS.c.rowid == Explanation.id).where(match),
        index_matches=select(func.count()).select_from(_FTS).where(match),
        ranked_order=[_FTS.c.rank, Explanation.id],
        id_order=[_FTS.c.rowid],  # the index's own order: no sort
    )


def _postgres_search(words: list[str]) -> _Search:
    # The expression must match the index's `to_tsvector('simple'::regconfig, text)` exactly
    # (a literal configuration, not a bound one) for the planner to use the GIN index.
    simple = literal_column("'simple'::regconfig")
    vector = func.to_tsvector(simple, Explanation.text)
    ts_query = func.to_tsquery(simple, bindparam("ts_query", tsquery(words)))
    match = vector.op("@@")(ts_query)
    return _Search(
        statement=_hit_columns().where(match),
        index_matches=select(func.count()).select_from(Explanation).where(match),
        ranked_order=[desc(func.ts_rank(vector, ts_query)), Explanation.id],
        id_order=[Explanation.id],
    )
