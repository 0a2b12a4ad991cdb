"""Shared fixtures: the built-in model loaded once, and the parity vectors in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import infdit

REPO = Path(__file__).resolve().parents[3]


def shared_dir() -> Path:
    env = os.environ.get("INFDIT_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def up() -> infdit.Upscaler:
    return infdit.Upscaler()


@pytest.fixture(scope="session")
def parity() -> Path:
    p = shared_dir() / "parity"
    if not p.is_dir():
        pytest.fail(f"the parity vectors are expected in {p} (or set INFDIT_SHARED_DIR)")
    return p
