"""e2e tests use the session `pipeline` fixture of tests/conftest.py (five service processes)."""
