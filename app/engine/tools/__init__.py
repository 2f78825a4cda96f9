"""Tool calls in model output: which format a model writes (from its template), and parsers that turn
its text into calls, whole or as it streams."""

from app.engine.tools.formats import TOOL_FORMATS, ToolFormat, detect_tool_format
from app.engine.tools.parse import ParsedToolCall, parse_tool_calls
from app.engine.tools.stream import ToolCallStream

__all__ = ["TOOL_FORMATS", "ToolFormat", "detect_tool_format", "ParsedToolCall", "parse_tool_calls",
           "ToolCallStream"]
