"""Shared test helpers (no tests here): tiny models and inputs, the in-process command line, tiny model files.

Importable as `helpers` because pyproject.toml's [tool.pytest.ini_options] puts tests/ on sys.path (`pythonpath`).
Pytest fixtures live in tests/conftest.py; the worker scripts here run in processes of their own.
"""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]  # tests/
HELPERS_DIR = TESTS_DIR / "helpers"
