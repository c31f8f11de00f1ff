"""Run the triggers service: `python -m services.triggers`."""

from pathlib import Path

from services.triggers.app import build
from shared.runtime import run_service

if __name__ == "__main__":
    run_service("triggers", build, migrations=Path(__file__).parent / "migrations")
