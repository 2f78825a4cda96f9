"""PySide6 tray app (the only place Qt lives)."""
