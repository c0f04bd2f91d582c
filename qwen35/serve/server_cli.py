"""`qwen35 serve`: load a checkpoint and run the OpenAI-compatible HTTP server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from qwen35.cli_types import api_key, json_object, port, positive_float, positive_int
from qwen35.distributed.parallel import torchrun_env
from qwen35.engine_args import EngineArgs, add_cli_args

TOOL_CALL_PARSERS = ("qwen3_coder", "qwen3_xml")  # vLLM's names for the XML tool-call format Qwen3.5 writes
REASONING_PARSERS = ("qwen3",)


def _one_of(flag: str, names: tuple[str, ...], what: str):
    def check(value: str) -> str:
        if value not in names:
            raise argparse.ArgumentTypeError(f"{value!r} is not supported: qwen35 parses {what} itself; the "
                                             f"Qwen3 parser{'s' if len(names) > 1 else ''} "
                                             f"({', '.join(names)}) {'are' if len(names) > 1 else 'is'} accepted")
        return value
    return check


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint directory or Hugging Face repo id, as "
                   "`vllm serve MODEL` (or --model; default: the embedded demo model)")
    p.add_argument("--model", help="checkpoint directory or Hugging Face repo id, e.g. Qwen/Qwen3.5-0.8B, from the "
                   "local Hugging Face cache or downloaded (default: the embedded demo model)")
    p.add_argument("--revision", help="with a repo id: the branch, tag or commit (default: main)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=port, default=8000, help="(default: 8000)")
    p.add_argument("--api-key", type=api_key,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /ping and /version (and "
                   "/metrics with --public-metrics); a non-ASCII key is matched as UTF-8 bytes")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--served-model-name", help="model name clients send (default: the repo id, or the checkpoint "
                   "folder name)")
    p.add_argument("--default-chat-template-kwargs", type=json_object, default=None,
                   help='JSON object, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--escape-special-tokens", action="store_true",
                   help="encode special-token strings written inside messages, tools or chat_template_kwargs (e.g. a "
                        "user's literal '<|im_end|>') as plain text, so client text cannot forge turns or media "
                        "placeholders (default: they become special tokens, as in vLLM)")
    p.add_argument("--max-waiting", type=positive_int, default=256,
                   help="queued requests beyond which new ones get 503 (default: 256)")
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="largest request body accepted (default: a max-length prompt, plus one image at the "
                   "per-image limit for a vision model; images and videos arrive inside it as data: URLs)")
    p.add_argument("--body-timeout", type=positive_float, default=60.0,
                   help="seconds a client has to send its request body (default: 60)")
    p.add_argument("--head-timeout", type=positive_float, default=10.0,
                   help="seconds a client has to send its request line and headers (default: 10)")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="open connections beyond which new ones get a 503 (default: 512)")
    p.add_argument("--max-media-jobs", type=positive_int, default=2,
                   help="requests whose images/videos are decoded and preprocessed at once; others wait (default 2)")
    vllm = p.add_argument_group("vLLM compatibility (accepted so vllm serve command lines run unchanged)")
    vllm.add_argument("--enable-auto-tool-choice", action="store_true",
                      help="tool calls are always parsed when a request has tools; accepted")
    vllm.add_argument("--tool-call-parser", type=_one_of("--tool-call-parser", TOOL_CALL_PARSERS,
                                                         "Qwen3.5's XML tool calls"),
                      metavar="|".join(TOOL_CALL_PARSERS), help="accepted (the format is Qwen3.5's XML)")
    vllm.add_argument("--reasoning-parser", type=_one_of("--reasoning-parser", REASONING_PARSERS,
                                                         "the <think> block"),
                      metavar="qwen3", help="accepted (reasoning is split off <think> ... </think>)")
    vllm.add_argument("--disable-log-requests", action="store_true", help="accepted (requests are not logged)")
    vllm.add_argument("--trust-remote-code", action="store_true",
                      help="accepted (qwen35 runs its own model code, never a checkpoint's)")
    vllm.add_argument("--disable-log-stats", action="store_true", help="accepted (no periodic stats are logged)")
    vllm.add_argument("--seed", type=int, default=0, help="seed of requests without their own (default: 0)")
    vllm.add_argument("--uvicorn-log-level", default="info",
                      choices=["critical", "error", "warning", "info", "debug", "trace"],
                      help="uvicorn's log level (default: info)")
    add_cli_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    add_cli_args(p, groups=("media",), only=MEDIA_ARGS)


MEDIA_ARGS = ("limit_mm_per_prompt", "allowed_local_media_path", "allow_remote_media", "allowed_media_domains",
              "media_fetch_timeout", "language_model_only")


def media_kwargs(args) -> dict:
    return {name: getattr(args, name) for name in MEDIA_ARGS}


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

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"give the model once: `qwen35 serve {args.model_tag}` and --model {args.model} differ")
    model = args.model_tag or args.model
    env = torchrun_env()
    if env is not None and env[0] != 0:  # a torchrun rank other than 0: a worker, serving rank 0's calls in LLM()
        LLM(model, revision=args.revision, seed=args.seed, **EngineArgs.cli_kwargs(args))
        return 0
    # Bind before loading the model, so a bad or busy address fails at once; uvicorn then serves on this socket.
    sock = bind(args.host, args.port)
    try:
        llm = LLM(model, revision=args.revision, seed=args.seed, **EngineArgs.cli_kwargs(args))
        app = build_app(llm, args.served_model_name, api_key=args.api_key,
                        default_chat_template_kwargs=args.default_chat_template_kwargs, max_waiting=args.max_waiting,
                        max_body_bytes=args.max_body_bytes, public_metrics=args.public_metrics,
                        body_timeout=args.body_timeout, escape_special_tokens=args.escape_special_tokens,
                        max_media_jobs=args.max_media_jobs, warm_up_grammars=True)
        # uvicorn handles SIGINT/SIGTERM: stops accepting, finishes in-flight responses, then runs the app's
        # shutdown hook, which stops the engine thread.
        server = uvicorn.Server(uvicorn_config(app, head_timeout=args.head_timeout,
                                               max_connections=args.max_connections,
                                               log_level=args.uvicorn_log_level,
                                               timeout_graceful_shutdown=10))
        if llm.workers is not None:  # a dead worker stops the server (in-flight requests fail with its message)
            def stop(message: str) -> None:
                logging.getLogger("qwen35.serve").error("%s; shutting the server down", message)
                server.should_exit = True

            llm.workers.watch(stop)
            app.state.engine.on_fatal = stop
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(startup_summary(llm, app.state.metrics.model_name, f"http://{host}:{sock.getsockname()[1]}"),
              file=sys.stderr, flush=True)
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host,
                                                sock.getsockname()[1])  # uvicorn says this only when it binds
        server.run(sockets=[sock])
    finally:
        sock.close()
    if llm.workers is not None and llm.workers.broken:
        print(f"qwen35 serve: stopped: tensor parallelism failed: {llm.workers.broken}", file=sys.stderr)
        return 1
    if llm.workers is not None:
        llm.shutdown()
    return 0 if server.started else 1
