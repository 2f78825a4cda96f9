"""The engine: registry, settings, prompt building, backends and the batching facade (no Qt, no HTTP)."""
