"""`python -m services.ingestion`: the ingestion service process."""

import gc
from pathlib import Path

from services.ingestion.app import build
from shared.runtime import run_service

if __name__ == "__main__":
    # A 1000-event request allocates ~100k short-lived objects: with the default thresholds the
    # collector runs ~100 times per request and rescans every long-lived object (FastAPI, schemas)
    # in the older generations. Freeze what import created and collect young objects less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    run_service("ingestion", build, migrations=Path(__file__).parent / "migrations")
