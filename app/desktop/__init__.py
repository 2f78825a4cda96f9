"""Desktop integration without Qt: the menu entry and icons (freedesktop), start on login (XDG autostart;
Windows' Run key and a macOS LaunchAgent, untested), and the crash log."""
