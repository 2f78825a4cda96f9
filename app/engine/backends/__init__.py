"""Backends: one small contract (see :mod:`app.engine.backends.base`), imported lazily."""
