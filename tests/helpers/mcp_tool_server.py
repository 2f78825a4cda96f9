"""A minimal MCP server over stdio (newline-delimited JSON-RPC) with one tool, for live agent tests.

``lookup_answer`` appends its arguments to the file named by $MCP_CALLS and answers with the text of
$MCP_ANSWER (which the scripted backend then says, so that the agent's turn ends).
"""

from __future__ import annotations

import json
import os
import sys

TOOL = {"name": "lookup_answer", "description": "Look up the answer to a question.",
        "inputSchema": {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"]}}


def result(method: str, params: dict) -> dict | None:
    if method == "initialize":
        return {"protocolVersion": params.get("protocolVersion", "2024-11-05"), "capabilities": {"tools": {}},
                "serverInfo": {"name": "test-tools", "version": "1.0"}}
    if method == "tools/list":
        return {"tools": [TOOL]}
    if method == "tools/call":
        with open(os.environ["MCP_CALLS"], "a", encoding="utf-8") as out:
            out.write(json.dumps({"name": params.get("name"), "arguments": params.get("arguments")}) + "\n")
        return {"content": [{"type": "text", "text": os.environ.get("MCP_ANSWER", "42")}], "isError": False}
    if method in ("resources/list", "prompts/list", "resources/templates/list"):
        return {method.split("/")[0]: [] if method != "resources/templates/list" else [], "resourceTemplates": []}
    if method == "ping":
        return {}
    return None


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if "id" not in msg:  # a notification
            continue
        answer = result(msg.get("method", ""), msg.get("params") or {})
        reply = {"jsonrpc": "2.0", "id": msg["id"]}
        reply.update({"result": answer} if answer is not None else
                     {"error": {"code": -32601, "message": f"unknown method {msg.get('method')}"}})
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
