"""Runtimes: the GPU stack (torch and a backend's library) in a per-user virtual environment, installed on
first use, and the model processes started inside it.

The double-click bundle holds the app, Qt and the server but not torch (gigabytes, per platform): like
LM Studio's runtimes, a backend's packages are installed from the package index when a model first needs
them (:mod:`.installer`), and that model's process then runs on the runtime's own Python with the app's
code importable (:mod:`.launcher`). A source checkout keeps running model processes in its own ``.venv``
(unless ``EXLLAMA_TRAY_RUNTIME_DIR`` names a runtime that has the backend; ``EXLLAMA_TRAY_RUNTIME_ONLY=1``
makes it ignore its own packages, as the bundle does). :mod:`.service` is the interface's side (the install
offer). No Qt and no HTTP here.
"""
