"""`qwen35 serve`: load a checkpoint and run the OpenAI-compatible HTTP server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from qwen35.cli_types import (add_cache_flags, add_quantization_flags, api_key, cache_kwargs, device, json_object,
                              mm_limits, port, positive_float, positive_int, quantization_kwargs)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--api-key", type=api_key,
                   help="require 'Authorization: Bearer KEY' on every route but /health (and /metrics with "
                   "--public-metrics); a non-ASCII key is matched as UTF-8 bytes")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--served-model-name", help="model name clients send (default: the checkpoint folder name)")
    p.add_argument("--default-chat-template-kwargs", type=json_object, default=None,
                   help='JSON object, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--escape-special-tokens", action="store_true",
                   help="encode special-token strings written inside messages, tools or chat_template_kwargs (e.g. a "
                        "user's literal '<|im_end|>') as plain text, so client text cannot forge turns or media "
                        "placeholders (default: they become special tokens, as in vLLM)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="queued requests beyond which new ones get 503")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--max-model-len", type=positive_int)
    p.add_argument("--max-num-seqs", type=positive_int, default=32)
    p.add_argument("--kv-cache-bytes", type=positive_int)
    add_quantization_flags(p)
    add_cache_flags(p)
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="largest request body accepted (default: a max-length prompt, plus one image at the "
                   "per-image limit for a vision model; images and videos arrive inside it as data: URLs)")
    p.add_argument("--body-timeout", type=positive_float, default=60.0,
                   help="seconds a client has to send its request body")
    p.add_argument("--head-timeout", type=positive_float, default=10.0,
                   help="seconds a client has to send its request line and headers")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="open connections beyond which new ones get a 503")
    p.add_argument("--max-media-jobs", type=positive_int, default=2,
                   help="requests whose images/videos are decoded and preprocessed at once; others wait (default 2)")
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
    p.add_argument("--media-fetch-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="total time one remote media fetch may take, redirects included (default 10)")
    p.add_argument("--limit-mm-per-prompt", type=mm_limits, default=None, metavar="JSON",
                   help='most images / videos per request, e.g. \'{"image": 4, "video": 1}\' (default 16 / 4)')
    p.add_argument("--language-model-only", action="store_true",
                   help="load a multimodal checkpoint without its vision tower (text only)")


def media_kwargs(args) -> dict:
    return {"allowed_local_media_path": args.allowed_local_media_path, "allow_remote_media": args.allow_remote_media,
            "allowed_media_domains": args.allowed_media_domains, "media_fetch_timeout": args.media_fetch_timeout,
            "limit_mm_per_prompt": args.limit_mm_per_prompt, "language_model_only": args.language_model_only}


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a ValueError naming the address and why it cannot be used. It listens only
    once uvicorn serves on it (as vLLM does), so clients are refused, not left waiting, while the model loads."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart while old connections linger
        sock.bind(addr)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise ValueError(f"cannot bind --host {host} --port {port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    import uvicorn

    from qwen35.llm import LLM
    from qwen35.serve.app import build_app
    from qwen35.serve.middleware import uvicorn_config
    from qwen35.serve.summary import startup_summary

    # Bind before loading the model, so a bad or busy address fails at once; uvicorn then serves on this socket.
    sock = bind(args.host, args.port)
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes, **media_kwargs(args),
                  **quantization_kwargs(args), **cache_kwargs(args))
        app = build_app(llm, args.served_model_name, api_key=args.api_key,
                        default_chat_template_kwargs=args.default_chat_template_kwargs, max_waiting=args.max_waiting,
                        max_body_bytes=args.max_body_bytes, public_metrics=args.public_metrics,
                        body_timeout=args.body_timeout, escape_special_tokens=args.escape_special_tokens,
                        max_media_jobs=args.max_media_jobs, warm_up_grammars=True)
        # uvicorn handles SIGINT/SIGTERM: stops accepting, finishes in-flight responses, then runs the app's
        # shutdown hook, which stops the engine thread.
        server = uvicorn.Server(uvicorn_config(app, head_timeout=args.head_timeout,
                                               max_connections=args.max_connections, log_level="info",
                                               timeout_graceful_shutdown=10))
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(startup_summary(llm, app.state.metrics.model_name, f"http://{host}:{sock.getsockname()[1]}"),
              file=sys.stderr, flush=True)
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host,
                                                sock.getsockname()[1])  # uvicorn says this only when it binds
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
