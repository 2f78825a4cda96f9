"""Shared test helpers: waiting, the tiny model's constants, the server factory, fake backends."""
