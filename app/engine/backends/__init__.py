"""Backends: one small contract (see :mod:`app.engine.backends.contract`), imported lazily."""
