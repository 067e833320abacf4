"""Every setting of the service in one place, read from FISHER_GUARD_* environment variables.

README's settings table is generated from this class (`fisher-guard settings --markdown`), so the two agree.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Service settings; each field's description is its documentation."""

    model_config = SettingsConfigDict(env_prefix="FISHER_GUARD_", extra="ignore")

    # models and devices
    models_dir: Path = Field(REPO_ROOT / "models", description="Folder of model cards, weights and detectors.")
    user_models_dir: Path | None = Field(None, description="Extra folder of user model cards (mounted volume).")
    device: str = Field("auto", description="'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:i]'.")
    memory_budget_mb: int = Field(1024, ge=16, description="Jacobian memory the spectrum may hold per chunk (MiB).")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
