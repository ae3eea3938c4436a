"""The repository's copy of the checkpoint manifests is the project's shared one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MANIFEST_DIR = REPO_ROOT.parent / "shared" / "manifests"


def test_copy_matches_the_shared_manifests():
    if not SHARED_MANIFEST_DIR.is_dir():
        pytest.skip(f"no shared manifests at {SHARED_MANIFEST_DIR} to compare the copy with")
    copy = REPO_ROOT / "tests" / "manifests"
    shared = {p.name: json.loads(p.read_text()) for p in SHARED_MANIFEST_DIR.glob("*.json")}
    copied = {p.name: json.loads(p.read_text()) for p in copy.glob("*.json")}
    assert copied == shared, "tests/manifests differs from ../shared/manifests: copy the shared files again"
