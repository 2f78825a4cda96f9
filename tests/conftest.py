"""Shared fixtures: the tiny models (generated once per run), registries, a models.json per test."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from keyring.backend import KeyringBackend

#: the server fixtures (serve, serve_module) for every test module
pytest_plugins = ("tests.helpers.servers",)
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


@pytest.fixture(autouse=True)
def _no_qt_window_left(request: pytest.FixtureRequest):
    """After a Qt test (one that uses the qapp fixture, directly or through qtbot), no top-level
    widget may be left once Qt's deferred deletions have run: the code under test deletes what it
    opens (TrayApp.shutdown), so nothing is left for Python's garbage collector to free in the
    middle of a later test's event loop. Other tests do not import Qt for this."""
    yield
    if "qapp" not in request.fixturenames:
        return
    import shiboken6
    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    left = [w for w in QApplication.topLevelWidgets() if shiboken6.isValid(w)]
    if left:
        names = [f"{type(w).__name__}({w.windowTitle()!r})" for w in left]
        for w in left:  # do not let them reach the next test
            w.close()
            w.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        pytest.fail(f"top-level widgets left after the test: {', '.join(names)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Once a Qt test is over and pytest has dropped its fixtures, collect the garbage it left in
    this thread. A test's qasync loop holds Python-owned QObjects (its timer object, with timers
    still registered) until it is collected; a collection started later by chance in another
    thread (qasync's executor threads run Python too) destroys them there, Qt cannot unregister
    their timers from that thread, and the next timer event crashes the process."""
    result = yield
    if "qapp" in getattr(item, "fixturenames", ()):
        gc.collect()
    return result


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
def memory_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An in-memory keyring for the test; the user's real keyring is never touched (nor the key file
    kept where there is no keyring: it is one in the test's folder)."""
    import keyring

    import app.server_config

    monkeypatch.setattr(app.server_config, "key_file", lambda: tmp_path / "api-key")
    previous = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    yield ring
    keyring.set_keyring(previous)


@pytest.fixture
def no_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A desktop without an OS keyring (keyring's fail backend); the key file in the test's folder."""
    import keyring
    from keyring.backends import fail

    import app.server_config

    path = tmp_path / "api-key"
    monkeypatch.setattr(app.server_config, "key_file", lambda: path)
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield path
    keyring.set_keyring(previous)


