"""Fast tests of the engine's rules: no model, no server, no Qt (the whole layer runs in seconds)."""
