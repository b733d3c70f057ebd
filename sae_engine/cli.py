"""`starmap train-sae`: train TopK SAEs on one or more hook points from one pass over a text stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import typer


def read_texts(path: Path, split: str | None) -> Iterator[str]:
    """Documents from a .txt file (one per line) or a .jsonl file (a "text" field; "split" filters)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix != ".jsonl":
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if split is None or record.get("split") == split:
                yield record["text"]


def register(app: typer.Typer) -> None:
    from starmap.cli import fail, settings_of

    @app.command("train-sae")
    def train_sae(
        ctx: typer.Context,
        hook_points: list[str] = typer.Option(
            ["blocks.14.hook_mlp_out"], "--hook-point", "-p", help="Repeat for several; all train from one model pass."
        ),
        tokens: int = typer.Option(200_000, min=1, help="Token budget of the model pass."),
        k: int = typer.Option(64, min=1, help="Active latents per token."),
        expansion_factor: int = typer.Option(10, min=1, help="d_sae = expansion_factor * d_model."),
        batch_size: int = typer.Option(2048, min=16, help="Tokens per SAE optimiser step."),
        context_size: int = typer.Option(128, min=8, help="Tokens per packed row."),
        lr: float | None = typer.Option(None, help="Default: 2e-4 / sqrt(d_sae / 2^14)."),
        texts: Path | None = typer.Option(
            None, help="A .txt (one document per line) or .jsonl file. Default: the corpus's training split."
        ),
        out: Path = typer.Option(Path("saes"), help="Output folder: one SAELens folder per hook point."),
    ) -> None:
        """Train TopK SAEs and write them as SAELens folders (data-parallel under `torchrun`)."""
        # Imported here: torch and transformers take seconds to import, and `starmap --help` needs neither.
        from sae_engine.checkpoints import save_saelens
        from sae_engine.distributed import init_from_env, rank
        from sae_engine.hooks import HookPointError, as_hook_points
        from sae_engine.models import ModelLoadError, load_model
        from sae_engine.tokens import pack_texts
        from sae_engine.training import MultiSAETrainer, SAETrainConfig

        settings = settings_of(ctx)
        init_from_env()
        source = texts or settings.data_dir / "corpus" / "corpus.jsonl"
        if not source.is_file():
            raise fail(f"no text source: {source} does not exist (run `starmap data build` or pass --texts)")
        try:
            points = as_hook_points(hook_points)
            loaded = load_model(settings.served_model, settings.data_dir, settings.device, settings.dtype)
        except (HookPointError, ModelLoadError) as exc:
            raise fail(str(exc)) from exc
        config = SAETrainConfig(k=k, expansion_factor=expansion_factor, batch_size=batch_size, lr=lr)
        if k > config.d_sae(loaded.d_model):
            raise fail(f"--k {k} exceeds d_sae {config.d_sae(loaded.d_model)}")
        stream = read_texts(source, None if texts else "train")
        trainer = MultiSAETrainer(loaded, points, config)
        try:
            trained = trainer.train(pack_texts(stream, loaded.tokenizer, context_size), total_tokens=tokens)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        if rank() != 0:
            return
        for hook, result in trained.items():
            if result.tokens_trained == 0:
                raise fail(f"{hook}: no training step ran; --tokens {tokens} is less than one batch of activations")
            folder = save_saelens(result.sae, out / hook, hook, loaded.name)
            typer.echo(f"{hook}: {result.tokens_trained} tokens, fvu {result.final_stats['fvu']:.3f} -> {folder}")
