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
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20,
                   help="largest request body accepted (images and videos arrive inside it as data: URLs)")
    add_media_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let image_url / video_url name local files (paths or file:// URLs) inside DIR")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image_url / video_url from public addresses (off by default: data: URLs only)")
    p.add_argument("--allowed-media-domains", nargs="+", metavar="HOST",
                   help="with --allow-remote-media: fetch from these hosts only, private addresses included")
    p.add_argument("--media-fetch-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="total time one remote media fetch may take, redirects included (default 10)")
    p.add_argument("--limit-mm-per-prompt", type=json.loads, default=None, metavar="JSON",
                   help='most images / videos per request, e.g. \'{"image": 4, "video": 1}\' (default 16 / 4)')
    p.add_argument("--language-model-only", action="store_true",
                   help="load a multimodal checkpoint without its vision tower (text only)")


def media_kwargs(args) -> dict:
    return {"allowed_local_media_path": args.allowed_local_media_path, "allow_remote_media": args.allow_remote_media,
            "allowed_media_domains": args.allowed_media_domains, "media_fetch_timeout": args.media_fetch_timeout,
            "limit_mm_per_prompt": args.limit_mm_per_prompt, "language_model_only": args.language_model_only}


def cmd_serve(args) -> int:
    import uvicorn

    from qwen35.llm import LLM, fix_mmap_threshold
    from qwen35.serve.app import build_app

    fix_mmap_threshold()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes, **media_kwargs(args))
    app = build_app(llm, args.served_model_name, api_key=args.api_key,
                    default_chat_template_kwargs=args.default_chat_template_kwargs, max_waiting=args.max_waiting,
                    max_body_bytes=args.max_body_bytes)
    # uvicorn handles SIGINT/SIGTERM: stops accepting, finishes in-flight responses, then runs the app's
    # shutdown hook, which stops the engine thread.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0
