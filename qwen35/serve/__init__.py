"""Serving: output parsers for reasoning and tool calls (the HTTP server comes with its own issue)."""
