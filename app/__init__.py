"""ExLlama Tray: a desktop tray app serving local LLMs over an OpenAI-compatible API."""

__version__ = "0.1.0"
