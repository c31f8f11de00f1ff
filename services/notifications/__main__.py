"""`python -m services.notifications`: the notifications service process."""

from pathlib import Path

from services.notifications.app import build
from shared.runtime import run_service

if __name__ == "__main__":
    run_service("notifications", build, migrations=Path(__file__).parent / "migrations")
