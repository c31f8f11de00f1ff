"""`python -m services.identity`: the identity service process."""

from pathlib import Path

from services.identity.app import build
from shared.runtime import run_service

run_service("identity", build, migrations=Path(__file__).parent / "migrations")
