"""Shared test set-up: the checkpoint manifests and a deterministic torch.

`tests/manifests/` is a copy of the project's shared manifests (every tensor name and shape of
the real checkpoint files), kept in the repository so that a clean checkout checks against them;
test_manifest_copy.py keeps the copy equal to ../shared/manifests where that exists."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_DIR = Path(os.environ.get("WAN22_MANIFESTS", REPO_ROOT / "tests" / "manifests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def manifest_dir() -> Path:
    if not MANIFEST_DIR.is_dir():
        pytest.skip(f"no checkpoint manifests at {MANIFEST_DIR} (set WAN22_MANIFESTS)")
    return MANIFEST_DIR


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """{task: official-layout folder} of tiny random checkpoints (written once per session)."""
    from wan_core.demo import ensure_tiny_checkpoints

    return ensure_tiny_checkpoints(str(tmp_path_factory.getbasetemp() / "wan22-cache"))


@pytest.fixture(scope="module")
def fake():
    """A local DashScope server on 127.0.0.1 (wan_core.testing.fake_dashscope)."""
    from wan_core.testing.fake_dashscope import FakeDashScope

    with FakeDashScope() as server:
        yield server


@pytest.fixture
def dashscope_env(fake, monkeypatch, dash_key):
    """DASH_API_KEY = the test module's `dash_key`, DASH_API_URL = the fake server, no script."""
    monkeypatch.setenv("DASH_API_KEY", dash_key)
    monkeypatch.setenv("DASH_API_URL", fake.url)
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    fake.script()
    return fake
