"""Serving: OpenAI protocol types, the async engine thread, the HTTP app, reasoning and tool-call parsing."""
