"""`python -m services.ingestion`: the ingestion service process."""

from pathlib import Path

from services.ingestion.app import build
from shared.runtime import run_service

if __name__ == "__main__":
    run_service("ingestion", build, migrations=Path(__file__).parent / "migrations")
