"""`starmap explain` and `starmap score`: explanations and simulation scores of a feature selection.

Both read the features' examples from the database and write their results there (or, with
`--examples FILE`, read `FeatureExamples` JSONL and write JSONL to `--out FILE`). With an endpoint
configured (`STARMAP_LLM_BASE_URL`) the LLM explainer and simulator run by default; without one, the
offline statistical explainer and the lexical simulator, whose results are labelled as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import typer
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from offline_pipeline.explain import store
from offline_pipeline.explain.llm_client import (
    CostLedger,
    LLMClient,
    LLMConfig,
    LLMError,
)
from offline_pipeline.explain.llm_explainer import LLMExplainer
from offline_pipeline.explain.records import Explanation, FeatureExamples, Score
from offline_pipeline.explain.runner import (
    Outcome,
    ScoringJob,
    explain_features,
    score_features,
)
from offline_pipeline.explain.scoring import ScoringConfig
from offline_pipeline.explain.simulation import LexicalSimulator, LLMSimulator
from offline_pipeline.explain.statistical_explainer import (
    StatisticalExplainer,
    word_counts,
)

T = TypeVar("T")


class ExplainerKind(str, Enum):
    auto = "auto"
    llm = "llm"
    statistical = "statistical"


class SimulatorKind(str, Enum):
    auto = "auto"
    llm = "llm"
    lexical = "lexical"


class Method(str, Enum):
    sls = "sls"
    tls = "tls"
    both = "both"


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_command)
    app.command("score")(score_command)


def _llm_config(ctx: typer.Context, wanted: str) -> LLMConfig | None:
    """The endpoint to use: None for the offline path; an error if 'llm' is asked without an endpoint."""
    from starmap.cli import fail, settings_of

    config = LLMConfig.from_settings(settings_of(ctx))
    if wanted == "llm" and config is None:
        raise fail("an LLM endpoint is needed: set STARMAP_LLM_BASE_URL (and STARMAP_LLM_MODEL)")
    if wanted in ("statistical", "lexical"):
        return None
    return config


def _with_client(config: LLMConfig | None, ledger: CostLedger, work: Callable[[LLMClient | None], Awaitable[T]]) -> T:
    from starmap.cli import fail

    async def main() -> T:
        if config is None:
            return await work(None)
        client = LLMClient(config, ledger)
        try:
            await client.start()
            return await work(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except LLMError as exc:
        raise fail(str(exc)) from exc


def _report(outcome: Outcome, done: str, ledger: CostLedger, skipped: dict[str, int]) -> None:
    typer.echo(f"{done}: {len(outcome.results)}; failed: {len(outcome.failures)}")
    for reason, count in skipped.items():
        if count:
            typer.echo(f"skipped ({reason}): {count}")
    for feature_id, error in list(outcome.failures.items())[:10]:
        typer.secho(f"  {feature_id}: {error}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"cost: {ledger.summary()}")


def _selection(
    sae_set: str | None, layer: list[int], feature: list[str], safety_only: bool, limit: int | None
) -> store.FeatureSelection:
    return store.FeatureSelection(
        sae_set=sae_set, layers=layer or [], feature_ids=feature or [], safety_only=safety_only, limit=limit
    )


def _database(ctx: typer.Context) -> tuple[Any, Any]:
    """(engine, session factory) of the configured database, migrated to the newest schema."""
    from starmap import db
    from starmap.cli import fail, settings_of

    settings = settings_of(ctx)
    if settings.database_url is None:
        settings.ensure_data_dir()
    url = settings.resolved_database_url
    try:
        db.upgrade(url)
    except (SQLAlchemyError, RuntimeError, FileNotFoundError) as exc:
        raise fail(f"database {url}: {exc}") from exc
    engine = db.make_engine(url)
    return engine, db.make_sessionmaker(engine)


def _load_examples(session: Any, features: list[Any]) -> tuple[list[tuple[Any, FeatureExamples]], int]:
    loaded, empty = [], 0
    for feature in tqdm(features, desc="load examples", unit="feature"):
        examples = store.feature_examples(session, feature)
        if examples is None:
            empty += 1
        else:
            loaded.append((feature, examples))
    return loaded, empty


def _read_jsonl(path: Path, kind: type[T]) -> list[T]:
    from starmap.cli import fail

    try:
        return store.read_jsonl(path, kind)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from exc


SELECTION_OPTIONS = {
    "sae_set": typer.Option(None, "--sae-set", help="Only features of this SAE set (by name)."),
    "layer": typer.Option(None, "--layer", help="Only these layers (repeat the option)."),
    "feature": typer.Option(None, "--feature", help='Only these features, "{layer}_{index}" (repeat the option).'),
    "safety_only": typer.Option(False, "--safety-only", help="Only features the safety filter kept."),
    "limit": typer.Option(None, "--limit", min=1, help="At most this many features."),
}


def explain_command(
    ctx: typer.Context,
    explainer: ExplainerKind = typer.Option(
        ExplainerKind.auto, help="auto: the LLM when STARMAP_LLM_BASE_URL is set, else the offline statistical explainer."
    ),
    sae_set: str | None = SELECTION_OPTIONS["sae_set"],
    layer: list[int] | None = SELECTION_OPTIONS["layer"],
    feature: list[str] | None = SELECTION_OPTIONS["feature"],
    safety_only: bool = SELECTION_OPTIONS["safety_only"],
    limit: int | None = SELECTION_OPTIONS["limit"],
    redo: bool = typer.Option(False, help="Explain again features this explainer has already explained."),
    held_out_per_side: int = typer.Option(5, min=1, help="Activating (and as many non-activating) queries kept from the explainer for scoring."),
    examples: Path | None = typer.Option(None, help="Read FeatureExamples JSONL instead of the database."),
    out: Path | None = typer.Option(None, help="With --examples: write the explanations here (JSONL)."),
) -> None:
    """Explain features in one sentence each, from examples at every activation level.

    The offline statistical explainer ranks activating tokens by lift over the token frequencies of
    all examples loaded in this run (every selected feature's activating and negative texts).
    """
    from starmap.cli import fail

    if (examples is None) != (out is None):
        raise fail("--examples and --out go together (JSONL in, JSONL out)")
    config = _llm_config(ctx, explainer.value)
    ledger = CostLedger()

    def make_explainer(client: LLMClient | None, items: list[FeatureExamples]) -> Any:
        if client is not None:
            return LLMExplainer(client)
        return StatisticalExplainer(word_counts(r for f in items for r in [*f.activating, *f.negatives]))

    if examples is not None:
        items = _read_jsonl(examples, FeatureExamples)

        async def work_file(client: LLMClient | None) -> Outcome:
            return await explain_features(make_explainer(client, items), items, held_out_per_side)

        outcome = _with_client(config, ledger, work_file)
        written = store.write_jsonl(out, outcome.results)
        _report(outcome, f"explained (written to {out}: {written})", ledger, {})
        return

    engine, sessions = _database(ctx)
    skipped = {"no activating example": 0, "already explained": 0}
    try:
        with sessions() as session:
            features = store.select_features(session, _selection(sae_set, layer, feature, safety_only, limit))
            loaded, skipped["no activating example"] = _load_examples(session, features)

            async def work(client: LLMClient | None) -> tuple[Outcome, dict[str, Any]]:
                chosen = make_explainer(client, [e for _, e in loaded])
                name, model = ("llm", client.model) if client else ("offline-statistical", "starmap-lift-v1")
                todo = [(f, e) for f, e in loaded if redo or not store.has_explanation(session, f, name, model)]
                skipped["already explained"] = len(loaded) - len(todo)
                by_id = {e.feature_id: f for f, e in todo}
                return await explain_features(chosen, [e for _, e in todo], held_out_per_side), by_id

            outcome, by_id = _with_client(config, ledger, work)
            for explanation in outcome.results:
                store.save_explanation(session, by_id[explanation.feature_id], explanation)
            session.commit()
    except SQLAlchemyError as exc:
        raise fail(f"database error: {exc}") from exc
    finally:
        engine.dispose()
    _report(outcome, "explained", ledger, skipped)


def score_command(
    ctx: typer.Context,
    method: Method = typer.Option(Method.both, help="sls (segment level, the paper's), tls (token level) or both."),
    simulator: SimulatorKind = typer.Option(
        SimulatorKind.auto, help="auto: the LLM when STARMAP_LLM_BASE_URL is set, else the offline lexical simulator."
    ),
    explainer: str | None = typer.Option(None, help="Score the newest explanation by this explainer (llm, offline-statistical); default: the newest of any."),
    sae_set: str | None = SELECTION_OPTIONS["sae_set"],
    layer: list[int] | None = SELECTION_OPTIONS["layer"],
    feature: list[str] | None = SELECTION_OPTIONS["feature"],
    safety_only: bool = SELECTION_OPTIONS["safety_only"],
    limit: int | None = SELECTION_OPTIONS["limit"],
    redo: bool = typer.Option(False, help="Score again explanations this simulator has already scored."),
    held_out_per_side: int = typer.Option(5, min=1, help="Activating (and as many non-activating) held-out queries."),
    segments: int = typer.Option(8, min=1, help="SLS: segments per query."),
    threshold_fraction: float = typer.Option(0.5, min=0.0, max=0.99, help="SLS: a segment is true above this fraction of the held-out maximum."),
    examples: Path | None = typer.Option(None, help="Read FeatureExamples JSONL instead of the database."),
    explanations: Path | None = typer.Option(None, help="With --examples: the explanations to score (JSONL)."),
    out: Path | None = typer.Option(None, help="With --examples: write the scores here (JSONL)."),
) -> None:
    """Score explanations by simulation on held-out queries (half activating, half not)."""
    from starmap.cli import fail

    if examples is not None and (explanations is None or out is None):
        raise fail("--examples needs --explanations and --out (JSONL in, JSONL out)")
    methods = ("sls", "tls") if method is Method.both else (method.value,)
    scoring = ScoringConfig(n_segments=segments, threshold_fraction=threshold_fraction)
    config = _llm_config(ctx, simulator.value)
    ledger = CostLedger()

    def make_simulator(client: LLMClient | None) -> Any:
        return LLMSimulator(client) if client is not None else LexicalSimulator()

    if examples is not None:
        by_feature = {e.feature_id: e for e in _read_jsonl(examples, FeatureExamples)}
        jobs = []
        for explanation in _read_jsonl(explanations, Explanation):
            if explanation.feature_id not in by_feature:
                raise fail(f"{explanations}: feature {explanation.feature_id} has no examples in {examples}")
            jobs.append(ScoringJob(explanation, by_feature[explanation.feature_id]))

        async def work_file(client: LLMClient | None) -> Outcome:
            return await score_features(make_simulator(client), jobs, methods, scoring, held_out_per_side)

        outcome = _with_client(config, ledger, work_file)
        written = store.write_jsonl(out, [s for scores in outcome.results for s in scores])
        _report(outcome, f"scored (written to {out}: {written} scores)", ledger, {})
        _summarise(outcome)
        return

    engine, sessions = _database(ctx)
    skipped = {"no activating example": 0, "no explanation": 0, "already scored": 0}
    try:
        with sessions() as session:
            features = store.select_features(session, _selection(sae_set, layer, feature, safety_only, limit))
            loaded, skipped["no activating example"] = _load_examples(session, features)

            async def work(client: LLMClient | None) -> tuple[Outcome, dict[str, Any]]:
                chosen = make_simulator(client)
                jobs, rows = [], {}
                for feature_row, feature_examples in loaded:
                    row = store.latest_explanation(session, feature_row, explainer)
                    if row is None:
                        skipped["no explanation"] += 1
                        continue
                    if not redo and all(store.has_score(session, row, m, chosen.name) for m in methods):
                        skipped["already scored"] += 1
                        continue
                    rows[feature_examples.feature_id] = row
                    jobs.append(ScoringJob(store.as_explanation(row, feature_row), feature_examples))
                return await score_features(chosen, jobs, methods, scoring, held_out_per_side), rows

            outcome, rows = _with_client(config, ledger, work)
            for scores in outcome.results:
                for score in scores:
                    store.save_score(session, rows[score.feature_id], score)
            session.commit()
    except SQLAlchemyError as exc:
        raise fail(f"database error: {exc}") from exc
    finally:
        engine.dispose()
    _report(outcome, "scored", ledger, skipped)
    _summarise(outcome)


def _summarise(outcome: Outcome) -> None:
    scores: list[Score] = [s for scores in outcome.results for s in scores]
    for method in ("sls", "tls"):
        values = [s.value for s in scores if s.method == method and s.value is not None]
        of_method = [s for s in scores if s.method == method]
        if not of_method:
            continue
        mean = f"{sum(values) / len(values):.3f}" if values else "n/a"
        typer.echo(
            f"{method}: {len(of_method)} scores, mean {mean}, undefined {len(of_method) - len(values)}, "
            f"parse failures {sum(s.n_parse_failures for s in of_method)}, "
            f"input_tokens {sum(s.input_tokens for s in of_method)}, output_tokens {sum(s.output_tokens for s in of_method)}"
        )
