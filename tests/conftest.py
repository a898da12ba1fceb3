import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tests.tiny import FAMILIES, build_model, grammar_text  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted models and tokenized text go to a per-session cache, never the user's."""
    monkeypatch.setenv("GAPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "gaprune-cache"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "grammar.txt"
    path.write_text(grammar_text(3000, seed=1))
    return path


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    """Text of the training grammar that training never reads."""
    path = tmp_path_factory.mktemp("held") / "held.txt"
    path.write_text(grammar_text(800, seed=2))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model folder per family."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        build_model(family, folders[family])
    return folders


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]
