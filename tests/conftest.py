"""Shared fixtures: the tiny models (generated once per run), registries, a models.json per test."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from keyring.backend import KeyringBackend

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def make_tiny(out: Path, seed: int) -> Path:
    if not (out / "model.safetensors").exists():
        subprocess.check_call(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(out), "--seed", str(seed)],
            stdout=subprocess.DEVNULL,
        )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model with a ChatML template (seed 1234)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", 1234)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other weights (seed 99)."""
    return make_tiny(tmp_path_factory.mktemp("models_b") / "tiny-b", 99)


@pytest.fixture
def models_path(tmp_path: Path) -> Path:
    return tmp_path / "models.json"


@pytest.fixture(autouse=True)
def _no_unexpected_errors(caplog: pytest.LogCaptureFixture):
    """Fail a test that logs an ERROR it did not expect (tests that expect one mark it)."""
    caplog.set_level(logging.INFO)
    yield
    allowed = getattr(caplog, "allowed_errors", False)
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    if errors and not allowed:
        pytest.fail("unexpected error logged: " + "; ".join(r.getMessage() for r in errors[:3]))


_EXIT_STATUS: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter finalization once Qt has been used.

    After every test has run and been reported, Python's shutdown destroys the remaining PySide6
    wrappers after the QApplication, which can crash the process ("shared QObject was deleted
    directly", then a segfault) and turn a green run red. The app itself quits through
    QApplication.quit() and does not go through this path.
    """
    import sys

    if "PySide6.QtWidgets" in sys.modules and "status" in _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["status"])


class MemoryKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.store.pop((service, username), None)


@pytest.fixture
def memory_keyring():
    """An in-memory keyring for the test; the user's real keyring is never touched."""
    import keyring

    previous = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    yield ring
    keyring.set_keyring(previous)


