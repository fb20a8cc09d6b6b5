"""Fixtures for the profiling tests: the example models written once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from wpk import examples
from wpk.profiling import profile_model


@pytest.fixture(scope="session")
def example_models(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    return {path.stem: path for path in examples.write_examples(directory)}


@pytest.fixture(scope="session")
def example_profiles(example_models) -> dict[str, dict]:
    """One short profile per example model (1 thread: steadier on a shared 2-core box)."""
    return {name: profile_model(path, threads=1, warmup=1, runs=5, progress=False, name="here")
            for name, path in example_models.items()}
