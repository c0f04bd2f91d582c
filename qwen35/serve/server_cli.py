"""`qwen35 serve`: load a checkpoint and run the OpenAI-compatible HTTP server under uvicorn."""

from __future__ import annotations

import argparse
import json


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="model name clients send (default: the checkpoint folder name)")
    p.add_argument("--default-chat-template-kwargs", type=json.loads, default=None,
                   help='JSON object, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 503")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import uvicorn

    from qwen35.llm import LLM
    from qwen35.serve.app import build_app

    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes)
    app = build_app(llm, args.served_model_name, api_key=args.api_key,
                    default_chat_template_kwargs=args.default_chat_template_kwargs, max_waiting=args.max_waiting)
    # uvicorn handles SIGINT/SIGTERM: stops accepting, finishes in-flight responses, then runs the app's
    # shutdown hook, which stops the engine thread.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
