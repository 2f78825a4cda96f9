"""The tray app's real widgets, offscreen, driving a real engine and server (pytest-qt + qasync)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import statistics
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("PySide6")


from app.engine.catalog.registry import Registry  # noqa: E402
from app.server_config import ServerSettingsStore, get_api_key  # noqa: E402
from tests.helpers.tiny import KEEP_TALKING, KEEP_TALKING_IDS  # noqa: E402
from tests.fake_ollama import CHATML_OLLAMA, FakeModel, FakeRegistry  # noqa: E402


@pytest.fixture
def qloop(qapp):
    import qasync

    loop = qasync.QEventLoop(qapp, already_running=False)
    asyncio.set_event_loop(loop)
    yield loop
    # closing shuts down qasync's default executor (QThreads used by asyncio.to_thread); a QThread
    # still alive when the interpreter exits aborts the process
    loop.close()
    asyncio.set_event_loop(None)


def run(qloop, coro, timeout: float = 180):
    """Run a coroutine on the qasync loop: Qt events and asyncio callbacks are both processed."""
    return qloop.run_until_complete(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await asyncio.sleep(0.02)


async def in_thread(fn):
    """Blocking client calls run in a thread so the loop (which serves them) keeps running."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


@pytest.fixture
def fake_ollama():
    reg = FakeRegistry().start()
    reg.add(("library", "tinychat", "latest"), FakeModel(CHATML_OLLAMA, system="You are tiny.",
                                                          params={"temperature": 0.4, "stop": ["<|im_end|>"]},
                                                          license="MIT"))
    yield reg
    reg.stop()


@pytest.fixture
def tray(qapp, qtbot, qloop, tmp_path, memory_keyring, fake_ollama):
    from app.ui.controller import AppController
    from app.ui.tray import TrayApp

    qapp.setQuitOnLastWindowClosed(False)  # as the app sets it (launch.py): a window closing quits nothing

    registry = Registry(tmp_path / "models.json")
    store = ServerSettingsStore(tmp_path / "server.json")
    controller = AppController(registry, store, port=0)  # any free port
    app = TrayApp(controller, registry_url=fake_ollama.url)
    run(qloop, controller.start())
    app.show()
    yield app
    try:
        run(qloop, controller.stop())
    finally:
        app.shutdown()  # what Quit does after stopping the controller; conftest checks no window is left


def menu_texts(menu) -> list[str]:
    return [a.text() for a in menu.actions()]


def test_add_load_request_plot_settings_unload(tray, qtbot, qloop, tiny_model_dir: Path, tmp_path: Path) -> None:
    run(qloop, _scenario(tray, qtbot, tiny_model_dir, tmp_path))


async def _scenario(tray, qtbot, tiny_model_dir: Path, tmp_path: Path) -> None:
    controller = tray.controller
    assert "Add model…" in menu_texts(tray.menu) and "Quit" in menu_texts(tray.menu)
    # add a model through the dialog: bad folder first
    dlg = tray.open_add_model()
    dlg.folder.setText(str(tmp_path))
    assert "config.json is missing" in dlg.folder_info.text()
    assert dlg.save() is False and "config.json is missing" in dlg.error.text()
    dlg.folder.setText(str(tiny_model_dir))
    assert "FP16" in dlg.folder_info.text() and "LlamaForCausalLM" in dlg.folder_info.text()
    dlg.ollama.setCurrentText("tinychat")
    await dlg.start_fetch()
    assert "You are tiny." in dlg.preview.toPlainText() and "temperature" in dlg.preview.toPlainText()
    dlg.name.setText("tiny:ui")
    assert dlg.save() is True
    saved = json.loads(controller.registry.path.read_text())["models"]["tiny:ui"]
    assert saved["ollama"]["system"] == "You are tiny."
    await until(lambda: "tiny:ui" in tray.model_actions)

    # load from the menu
    tray.model_actions["tiny:ui"]["Load"].trigger()
    await until(lambda: any(s.state == "ready" for s in controller.engine.model_states()), 60)
    await until(lambda: tray.model_actions["tiny:ui"]["menu"].text().startswith("●"))
    assert "tiny:ui" in tray.tooltip

    # a request with the openai SDK
    client = openai.OpenAI(base_url=controller.url, api_key="x", max_retries=0, timeout=60)
    out = await in_thread(lambda: client.chat.completions.create(
        model="tiny:ui", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        logit_bias=KEEP_TALKING))
    assert out.usage.completion_tokens == 6

    # the plots' data grows
    tray.show_status()
    # 5 minutes shown (the 1-minute range holds at most 60 points: on a slow machine it is full here)
    tray.status_window.range.setCurrentText("5 min")
    before = tray.status_window.point_count()
    # idle, the plots are redrawn twice every 10 samples (tray.on_sample): wait out one such cycle
    await until(lambda: tray.status_window.point_count() >= before + 2, 25)
    assert tray.status_window.table.rowCount() >= 1

    # change a setting in the dialog: invalid first, then valid
    sdlg = tray.open_model_settings("tiny:ui")
    assert "from Ollama" in sdlg.sources["temperature"].text()
    sdlg.set_value("top_p", "7")
    assert sdlg.save() is False and sdlg.errors["top_p"].isVisible()
    assert "less than or equal to 1" in sdlg.errors["top_p"].text()
    sdlg.set_value("top_p", "")
    sdlg.set_value("max_tokens", "3")
    sdlg.set_value("system_prompt", "Be brief.")
    assert "Be brief." in sdlg.preview.toPlainText()
    assert sdlg.save() is True
    saved = json.loads(controller.registry.path.read_text())["models"]["tiny:ui"]
    assert saved["settings"] == {"max_tokens": 3, "system_prompt": "Be brief."}
    out = await in_thread(lambda: client.chat.completions.create(
        model="tiny:ui", messages=[{"role": "user", "content": "hi"}], logit_bias=KEEP_TALKING))
    assert out.usage.completion_tokens == 3  # the next request follows the saved default

    # unload from the menu
    tray.model_actions["tiny:ui"]["Unload"].trigger()
    await until(lambda: not controller.engine.model_states())
    await until(lambda: not tray.model_actions["tiny:ui"]["menu"].text().startswith("●"))


def test_server_settings_api_key_in_keyring(tray, qtbot, qloop, memory_keyring) -> None:
    dlg = tray.open_server_settings()
    dlg.network.setChecked(True)
    dlg.check_and_accept()
    assert "needs an API key" in dlg.error.text()
    dlg.generate_key()
    key = get_api_key()
    assert key and key.startswith("sk-local-") and memory_keyring.store
    dlg.network.setChecked(False)  # stay on loopback in tests; the key still guards nothing here
    dlg.cors.setChecked(True)
    dlg.origins.setText("not-a-url")
    dlg.check_and_accept()
    assert "must start with http" in dlg.error.text()
    assert key not in tray.controller.registry.path.read_text() if tray.controller.registry.path.exists() else True
    # OK with valid settings: the dialog closes and the listener moves to the new port
    dlg.cors.setChecked(False)
    dlg.origins.setText("")
    port = free_port()
    dlg.port.setValue(port)
    dlg.check_and_accept()
    run(qloop, until(lambda: tray.controller.listener is not None and tray.controller.listener.port == port))
    assert tray.controller.store.load().port == port


def test_server_settings_ollama_port(tray, qtbot, qloop, memory_keyring) -> None:
    dlg = tray.open_server_settings()
    assert not dlg.ollama.isChecked() and not dlg.ollama_port.isEnabled()  # off by default
    dlg.ollama.setChecked(True)
    assert dlg.ollama_port.isEnabled() and dlg.ollama_port.value() == 11434
    port = free_port()
    dlg.port.setValue(port)
    dlg.ollama_port.setValue(port)
    dlg.check_and_accept()
    assert "must differ from the server's port" in dlg.error.text()  # refused at OK, the dialog stays
    ollama_port = free_port()
    dlg.ollama_port.setValue(ollama_port)
    dlg.check_and_accept()
    run(qloop, until(lambda: tray.controller.listener is not None and tray.controller.listener.ollama_port == ollama_port))
    tags = run(qloop, asyncio.to_thread(httpx.get, f"http://127.0.0.1:{ollama_port}/api/tags", timeout=10))
    assert tags.status_code == 200 and "models" in tags.json()  # the Ollama API answers on Ollama's port
    saved = tray.controller.store.load()
    assert saved.ollama_port_enabled and saved.ollama_port == ollama_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_deletes_every_window_and_leaves_the_engine(tray, qloop, tiny_model_dir: Path) -> None:
    """The path Quit takes: windows, dialogs and the menu are deleted by Qt, the engine calls no one."""
    import shiboken6
    from PySide6.QtCore import QCoreApplication, QEvent

    from tests.server_harness import register

    engine = tray.controller.engine
    register(tray.controller.registry, "menu", tiny_model_dir)
    tray.bridge.notify_registry_changed()
    tray.model_actions["menu:latest"]["Settings…"].trigger()  # from the model's submenu
    settings = tray.dialogs[-1]
    assert settings.windowTitle().startswith("Settings — menu")
    add = tray.open_add_model()
    add.ollama.setCurrentText("tinychat")
    fetch = add.start_fetch()
    add.close()  # closed while fetching: the fetch is cancelled, the dialog deleted
    run(qloop, asyncio.wait([fetch]))
    assert fetch.cancelled()
    server = tray.open_server_settings()
    tray.show_status()
    windows = [settings, server, tray.status_window, tray.menu, tray.models_menu]
    assert engine._listeners and engine._sample_listeners
    tray.shutdown()
    tray.shutdown()  # a second call does nothing
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not any(shiboken6.isValid(w) for w in windows + [add, tray])
    assert engine._listeners == [] and engine._sample_listeners == []


def test_settings_of_a_model_removed_meanwhile_say_so(tray, tiny_model_dir: Path) -> None:
    """A menu built before the model was removed (by the CLI, say): a readable message, no dialog."""
    from PySide6.QtWidgets import QMessageBox

    from tests.server_harness import register

    register(tray.controller.registry, "gone", tiny_model_dir)
    tray.bridge.notify_registry_changed()
    tray.controller.registry.remove("gone")
    assert tray.open_model_settings("gone:latest") is None
    (box,) = [d for d in tray.dialogs if isinstance(d, QMessageBox)]
    assert box.text() == "The model 'gone:latest' does not exist" and box.isVisible() and not box.isModal()


def test_server_settings_with_a_taken_port_keep_serving_and_the_app_alive(tray, qloop, memory_keyring) -> None:
    """The port is in use: the old listener serves on, nothing is saved, the warning does not block the
    loop (a modal dialog inside the task froze the app: the sampler stopped, Quit hung)."""
    from PySide6.QtWidgets import QMessageBox

    from app.server_config import ServerSettings

    controller = tray.controller
    old_port = controller.listener.port
    saved = controller.store.path.read_text() if controller.store.path.exists() else None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        tray._server_settings_chosen(ServerSettings(port=busy))

        async def scenario() -> None:
            await until(lambda: any(isinstance(d, QMessageBox) for d in tray.dialogs))
            samples = len(controller.engine.metrics.history(600))
            health = await in_thread(lambda: httpx.get(f"http://127.0.0.1:{old_port}/health", timeout=10))
            assert health.status_code == 200  # still serving on the old port
            await until(lambda: len(controller.engine.metrics.history(600)) >= samples + 2, 10)  # not frozen

        run(qloop, scenario())
    (box,) = [d for d in tray.dialogs if isinstance(d, QMessageBox)]
    assert "not applied" in box.text() and f"{busy}" in box.text() and not box.isModal()
    assert controller.listener.port == old_port and controller.url.endswith(f":{old_port}/v1")
    assert (controller.store.path.read_text() if controller.store.path.exists() else None) == saved
    box.close()


def test_event_loop_stays_responsive_while_loading_and_generating(tray, qloop, tiny_model_dir: Path) -> None:
    run(qloop, _lag_scenario(tray, tiny_model_dir))


async def _lag_scenario(tray, tiny_model_dir: Path) -> None:
    from tests.server_harness import register

    register(tray.controller.registry, "lag", tiny_model_dir)
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t0 - 0.01)

    probe_task = asyncio.ensure_future(probe())
    await tray.controller.engine.load("lag")
    client = openai.OpenAI(base_url=tray.controller.url, api_key="x", max_retries=0, timeout=120)

    def one(i: int) -> int:
        chunks = client.chat.completions.create(model="lag", messages=[{"role": "user", "content": str(i)}],
                                                max_tokens=250, stream=True, logit_bias=KEEP_TALKING)
        return sum(1 for _ in chunks)

    def eight() -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(8)))

    counts = await in_thread(eight)
    stop.set()
    await probe_task
    assert all(c > 10 for c in counts)
    lags.sort()
    p99 = lags[int(len(lags) * 0.99) - 1]
    print(f"\nevent-loop lag over {len(lags)} probes: p50 {statistics.median(lags) * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {lags[-1] * 1e3:.1f} ms")
    assert p99 < 0.25, f"event loop lag p99 {p99 * 1e3:.0f} ms"



def test_model_process_is_read_by_the_qt_event_loop(qloop, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The tray runs on qasync: a model process's pipe is watched by Qt's event dispatcher."""
    from app.engine.backends.model_process.client import ProcessBackend
    from app.engine.facade import CompletionRequest, Engine
    from app.engine.events import TextDelta
    from app.engine.serving.pipe_runner import PipeRunner
    from app.engine.settings.schema import Settings
    from tests.server_harness import register

    target = "app.engine.backends.transformers_backend:TransformersBackend"
    registry = Registry(tmp_path / "models.json")
    register(registry, "tiny", tiny_model_dir, context_length=256)
    engine = Engine(registry, backend_factory=lambda entry, settings: ProcessBackend(
        target, "transformers", entry.model_dir, keep_spare=False, context_length=256, max_batch=2))

    async def scenario() -> tuple[list[str], str, object]:
        await engine.start()
        try:
            request = CompletionRequest("tiny", "Once upon a time", Settings(temperature=0.0, max_tokens=12),
                                        stream=True, logit_bias=KEEP_TALKING_IDS)
            pieces = [e.text async for e in await engine.submit_completion(request) if isinstance(e, TextDelta)]
            whole = await (await engine.submit_completion(CompletionRequest(
                "tiny", "Once upon a time", Settings(temperature=0.0, max_tokens=12), logit_bias=KEEP_TALKING_IDS))).result()
            return pieces, whole.text, engine.manager.resident("tiny:latest").runner
        finally:
            await engine.close()

    pieces, whole, runner = run(qloop, scenario())
    assert isinstance(runner, PipeRunner)
    assert len(pieces) > 1 and "".join(pieces) == whole != ""


def test_add_model_dialog_explains_a_bad_context_and_a_bad_name(tray, tiny_model_dir: Path) -> None:
    """Issue #15 item 7: 'invalid literal for int()' and names such as '../etc' were what users got."""
    dlg = tray.open_add_model()
    dlg.folder.setText(str(tiny_model_dir))
    dlg.ollama.setCurrentText("")
    dlg.name.setText("tiny-ui")
    dlg.context.setText("abc")
    assert dlg.save() is False
    assert dlg.error.text().startswith("Context length: ") and "you typed 'abc'" in dlg.error.text()
    assert "invalid literal" not in dlg.error.text()
    dlg.context.setText("")
    dlg.name.setText("../etc")
    assert dlg.save() is False and "model name '../etc'" in dlg.error.text()
    assert tray.controller.registry.names() == []
    dlg.close()


def test_without_an_os_keyring_the_key_is_kept_in_a_private_file_and_the_dialog_says_so(tray, no_keyring) -> None:
    """Issue #15 item 4: Generate raised NoKeyringError (a traceback on stderr) and network mode could
    never be enabled on a bare Linux desktop."""
    import os
    import stat

    dlg = tray.open_server_settings()
    assert dlg.key_note.isHidden()
    dlg.generate_key()
    key = dlg.key.text()
    assert key.startswith("sk-local-") and dlg.error.text() == ""
    assert no_keyring.read_text().strip() == key and get_api_key() == key
    if os.name == "posix":
        assert stat.S_IMODE(no_keyring.stat().st_mode) == 0o600
    assert not dlg.key_note.isHidden() and str(no_keyring) in dlg.key_note.text()
    assert "No OS keyring" in dlg.key_note.text()
    again = tray.open_server_settings()  # opened later: it still says where the key is
    assert str(no_keyring) in again.key_note.text()
    dlg.reset_key()
    assert not no_keyring.exists() and get_api_key() is None and dlg.key_note.isHidden()
    dlg.close()
    again.close()


def test_without_a_tray_the_status_window_is_the_main_window_with_every_action(tray, qloop, tiny_model_dir: Path,
                                                                               monkeypatch) -> None:
    """Issue #15 item 3: without a system tray the status window had no menu (no Add model, Load,
    Settings, Quit) and closing it left the process running with no UI. Offscreen Qt has no tray."""
    from PySide6.QtWidgets import QApplication

    from tests.server_harness import register

    assert tray.window_first and tray.tray is None
    tray.show()
    assert tray.status_window.isVisible() and tray.status_window.windowTitle() == "ExLlama Tray"
    bar = tray.status_window.layout().menuBar()
    assert [a.text() for a in bar.actions()] == ["Models", "App"]
    app_menu = bar.actions()[1].menu()
    assert [a.text() for a in app_menu.actions() if a.text()] == [
        "Add model…", "Copy API URL", "Server settings…", "Open log folder", "Install runtime…", "Start on login",
        "Add to applications menu", "Quit"]
    register(tray.controller.registry, "window", tiny_model_dir)
    tray.bridge.notify_registry_changed()
    models = bar.actions()[0].menu()
    (entry,) = [a for a in models.actions() if "window" in a.text()]
    assert [a.text() for a in entry.menu().actions()] == ["Load", "Unload", "Settings…"]
    entry.menu().actions()[0].trigger()  # Load, from the window's menu bar
    run(qloop, until(lambda: any(s.state == "ready" for s in tray.controller.engine.model_states()), 120))
    quits: list[int] = []
    monkeypatch.setattr(QApplication, "quit", lambda *args: quits.append(1))
    tray.status_window.closedByUser.emit()  # what the window's close button does
    run(qloop, until(lambda: tray.shut_down))
    assert quits == [1] and tray.controller.listener is None and tray.controller.engine.model_states() == []


def test_idle_plots_start_at_zero_with_whole_counts(tray, qloop) -> None:
    """Issue #15 item 8: idle plots had a -400..400 axis labelled 'count (x0.001)'."""
    window = tray.status_window
    run(qloop, until(lambda: len(tray.controller.engine.metrics.history(60)) >= 2, 10))
    window.refresh()
    for plot in (window.requests_plot, window.tps_plot, window.memory_plot):
        low, high = plot.getViewBox().viewRange()[1]
        assert low == 0 and high >= 1, (plot, low, high)
        axis = plot.getAxis("left")
        assert not axis.autoSIPrefix and "x0.001" not in axis.labelString()
    assert window.requests_plot.getViewBox().viewRange()[1][1] < 2  # idle: 0 requests, an axis up to 1
    rss = window.memory_plot.getViewBox().viewRange()[1][1]
    assert rss > 50  # the process's own MiB, on an axis from 0


def test_a_settings_field_says_at_once_what_is_wrong_with_what_was_typed(tray, tiny_model_dir: Path) -> None:
    """Issue #15 item 7: fields accepted invalid text until Save, though the README says they refuse it."""
    from tests.server_harness import register

    register(tray.controller.registry, "typed", tiny_model_dir)
    dlg = tray.open_model_settings("typed:latest")
    dlg.set_value("top_k", "many")
    assert not dlg.errors["top_k"].isHidden() and dlg.errors["top_k"].text() == "must be a whole number"
    dlg.set_value("top_k", "20")
    assert dlg.errors["top_k"].isHidden()
    dlg.set_value("temperature", "9")
    assert not dlg.errors["temperature"].isHidden() and "less than or equal to 5" in dlg.errors["temperature"].text()
    dlg.close()


def _menu_rows(menu) -> list[str]:
    """The menu as shown: '---' for a separator, 'name ▸' for a submenu, '(off)' after a disabled entry."""
    rows = []
    for a in menu.actions():
        if a.isSeparator():
            rows.append("---")
        else:
            rows.append(a.text() + (" ▸" if a.menu() else "") + ("" if a.isEnabled() else " (off)"))
    return rows


def test_the_tray_menu_has_the_state_on_top_and_models_one_level_down(tray, qloop, tiny_model_dir: Path) -> None:
    """Issue #15 item 8: the menu was three levels deep (Models ▸ name ▸ Load) with no status line."""
    from tests.server_harness import register

    rows = _menu_rows(tray.menu)
    assert rows[0].startswith("Serving at http://127.0.0.1:") and rows[0].endswith("— no model loaded (off)")
    assert rows[1:] == ["---", "No models yet — Add model…", "---", "Add model…", "Server settings…",
                        "Status window", "Copy API URL", "Open log folder", "Install runtime…", "Start on login",
                        "Add to applications menu", "---", "Quit"]
    tray.menu.actions()[2].trigger()  # the empty list's entry opens the add-model dialog
    assert type(tray.dialogs[-1]).__name__ == "AddModelDialog"
    tray.dialogs[-1].close()
    register(tray.controller.registry, "alpha", tiny_model_dir, context_length=256, batch_size=3)
    register(tray.controller.registry, "beta", tiny_model_dir)
    tray.bridge.notify_registry_changed()
    rows = _menu_rows(tray.menu)
    assert rows[1:5] == ["---", "alpha ▸", "beta ▸", "---"] and "Models ▸" not in rows
    for entry in tray.menu.actions()[2:4]:  # two levels: each model's actions have no submenu
        assert _menu_rows(entry.menu()) == ["Load", "Unload (off)", "Settings…"]
    tray.menu.actions()[2].menu().actions()[0].trigger()  # alpha ▸ Load
    port = tray.controller.listener.port
    run(qloop, until(lambda: tray.menu.actions()[0].text().endswith("ready on transformers, continuous batching (3)"), 120))
    assert tray.menu.actions()[0].text() == (
        f"Serving at http://127.0.0.1:{port}/v1 — model alpha ready on transformers, continuous batching (3)")
    assert _menu_rows(tray.menu)[2] == "● alpha ▸"
    assert _menu_rows(tray.model_actions["alpha:latest"]["menu"].menu()) == ["Load (off)", "Unload", "Settings…"]
    tray.model_actions["alpha:latest"]["Unload"].trigger()
    run(qloop, until(lambda: tray.menu.actions()[0].text().endswith("— no model loaded"), 60))
    assert _menu_rows(tray.menu)[2] == "alpha ▸"


def test_the_status_line_says_when_the_api_server_is_not_running() -> None:
    from app.engine.facade import ModelState
    from app.ui.tray_menu import MenuState, status_line

    loading = ModelState("tiny:latest", "loading", 0.4, "loading weights", "transformers", "continuous", 0)
    assert status_line(MenuState("http://127.0.0.1:8000/v1", False, "port 8000 is in use", [loading], None)) == (
        "API server not running: port 8000 is in use — loading tiny 40%")
    assert status_line(MenuState("http://127.0.0.1:8000/v1", True, None, [], "model x failed to load: no")) == (
        "Serving at http://127.0.0.1:8000/v1 — error: model x failed to load: no")
