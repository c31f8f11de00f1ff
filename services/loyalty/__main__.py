"""`python -m services.loyalty`: the loyalty worker process."""

from pathlib import Path

from services.loyalty.app import build
from shared.runtime import run_service

run_service("loyalty", build, migrations=Path(__file__).parent / "migrations")
