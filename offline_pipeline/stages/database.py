"""Stage `database`: the finished run written into the database (see `offline_pipeline.db_writer`)."""

from __future__ import annotations

from offline_pipeline.db_writer import RunFolders, write_run
from offline_pipeline.runner import StageContext
from offline_pipeline.stages.tags import safety_tags


def run_database(ctx: StageContext) -> dict:
    folders = RunFolders(**{name: ctx.input(name) for name in RunFolders.__dataclass_fields__})
    counts = write_run(ctx.settings.resolved_database_url, ctx.preset, ctx.run_dir, folders, safety_tags(ctx))
    return counts
