"""The aiohttp OpenAI-compatible server (no Qt)."""
