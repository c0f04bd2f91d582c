"""The OpenAI-compatible HTTP app: `build_app` assembles the served model's `ServerContext`, the middleware (API key,
body limits, connection guard), the error handlers and the routes: chat completions (`chat_routes`), completions
(`completion_routes`), the Responses API (`responses_api`), and here models (`/v1/models`, `/v1/models/{id}`),
health (`/health`, `/ping`), `/version`, Prometheus metrics and tokenize/detokenize. A thin layer over
`AsyncEngine`; errors are OpenAI error bodies with HTTP statuses.

The routes parse and validate their own JSON bodies, and render and tokenize prompts, in worker threads, so one
large request cannot stall the event loop (the health check, other streams). A client that disconnects has its
requests aborted, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import qwen35
from qwen35.serve import chat_routes, completion_routes
from qwen35.serve.async_engine import AsyncEngine
from qwen35.serve.context import ServerContext, parse_body
from qwen35.serve.metrics import Metrics
from qwen35.serve.middleware import ERROR_RESPONSES, APIError, Guard, InFlight, check_api_key, install_error_handlers
from qwen35.serve.prompts import Prompts, default_max_body_bytes
from qwen35.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qwen35.serve.responses_api import install_responses_api


def _document_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """The routes parse their own bodies, so FastAPI does not see the request models: put them in the OpenAPI
    document by hand."""
    generate = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema([(m, "validation") for m in bodies.values()],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            for path, model in bodies.items():
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        return app.openapi_schema

    app.openapi = openapi


router = APIRouter()


@router.get("/health")
async def health():
    return PlainTextResponse("")


@router.api_route("/ping", methods=["GET", "POST"])
async def ping():  # as vLLM (SageMaker's health check): /health under another name
    return PlainTextResponse("")


@router.get("/version")
async def version():
    return {"version": qwen35.__version__}


@router.get("/metrics")
async def get_metrics(request: Request):
    ctx: ServerContext = request.app.state.ctx
    return PlainTextResponse(ctx.metrics.render(ctx.engine), media_type="text/plain; version=0.0.4")


def model_card(ctx: ServerContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": int(time.time()), "owned_by": "qwen35",
            "root": str(ctx.llm.model_path), "max_model_len": ctx.max_model_len}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.ctx)]}


@router.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
async def get_model(request: Request):  # ids may hold slashes (hub ids); read here, so no 422 is documented
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(request.path_params["model_id"])
    return model_card(ctx)


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req = await parse_body(request, TokenizeRequest)
    ctx.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
    if req.prompt is not None:
        ids = await asyncio.to_thread(ctx.prompts.encode, req.prompt, None)
    else:
        text, images, videos = await asyncio.to_thread(ctx.prompts.render_chat, req.messages, None,
                                                       req.chat_template_kwargs, req.add_generation_prompt)
        ids, _ = await ctx.with_media(await asyncio.to_thread(ctx.prompts.encode, text, None), images, videos)
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req = await parse_body(request, DetokenizeRequest)
    ctx.check_model(req.model)
    bad = [t for t in req.tokens if not 0 <= t < ctx.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", "tokens")
    return {"prompt": await asyncio.to_thread(ctx.tokenizer.decode, req.tokens)}


def build_app(llm, served_model_name: str | None = None, api_key: str | None = None,
              default_chat_template_kwargs: dict | None = None, max_waiting: int = 256,
              max_body_bytes: int | None = None, engine: AsyncEngine | None = None, public_metrics: bool = False,
              body_timeout: float = 60.0, escape_special_tokens: bool = False, max_media_jobs: int = 2,
              warm_up_grammars: bool = False) -> FastAPI:
    """max_body_bytes: None derives it from the context length (see prompts.default_max_body_bytes).
    api_key: required on every route but /health, /ping and /version (and /metrics when public_metrics);
    compared as UTF-8 bytes.
    body_timeout: seconds a client has to send its whole request body (408 after).
    max_media_jobs: requests whose media are decoded and preprocessed at once (each at most one source image or
    video frame at full size at a time); the others wait their turn, so media memory in flight stays bounded.
    warm_up_grammars: build the structured-output tokenizer in the background now (seconds for a full vocabulary)
    rather than on the first constrained request."""
    check_api_key(api_key)
    if max_media_jobs < 1:
        raise ValueError(f"max_media_jobs must be at least 1, got {max_media_jobs}")
    engine = engine or AsyncEngine(llm)
    model_name = served_model_name or getattr(llm, "model_name", None) or llm.model_path.name
    prompts = Prompts(llm, engine.max_model_len, default_chat_template_kwargs, escape_special_tokens)
    metrics = Metrics(model_name, engine.max_model_len)
    ctx = ServerContext(llm, engine, model_name, prompts, metrics, max_waiting, max_media_jobs)
    if warm_up_grammars:
        ctx.structured.warm_up()
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(ctx.max_model_len, prompts.max_token_bytes,
                                                llm.media_limits.max_image_bytes if llm.processor_config else None)
    in_flight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn cancels what still runs when its graceful-shutdown time is up: let those requests send their 503
        await in_flight.wait_idle(timeout=2.0)
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="qwen35", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.ctx, app.state.engine, app.state.metrics = ctx, engine, ctx.metrics
    app.state.max_body_bytes = max_body_bytes
    open_paths = ("/health", "/ping", "/version") + (("/metrics",) if public_metrics else ())
    app.add_middleware(Guard, api_key=api_key, open_paths=open_paths, max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout, in_flight=in_flight)
    install_error_handlers(app, lambda: ctx.metrics.requests.update(["error"]))
    _document_bodies(app, {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})
    app.include_router(chat_routes.router)
    app.include_router(completion_routes.router)
    app.include_router(router)
    install_responses_api(app, functools.partial(chat_routes.run_chat, ctx), model_name,
                          lambda text: len(ctx.tokenizer.encode(text)))
    return app

