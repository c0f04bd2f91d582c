"""`AsyncEngine`: drives the (not thread-safe) `LLMEngine` from one background thread for an asyncio server.

Requests and aborts reach the thread through a command list guarded by a condition variable and are applied
between steps; each request's outputs go back to its own `asyncio.Queue` via `loop.call_soon_threadsafe`. An error
while adding a request goes to that request only, and so does a request the step failed alone (`RequestFailed`);
an error of the step as a whole (the shared forward) fails the requests then in flight and the loop carries on,
except a dead tensor-parallel worker (`WorkerDied`), after which no step can run: `on_fatal` tells the server.
With no work the thread sleeps on the condition (no spinning).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from qwen35.distributed.parallel import WorkerDied
from qwen35.engine.llm_engine import RequestFailed
from qwen35.outputs import RequestOutput
from qwen35.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ADDED = object()  # first item of a request's queue once the engine accepted it


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative `RequestOutput` snapshots."""

    def __init__(self, engine: "AsyncEngine", request_id: str, queue: asyncio.Queue):
        self._engine, self.request_id, self._queue = engine, request_id, queue
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop the request (if still running) and free its cache; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_pending_adds = 0
        self._stopping = False
        self.on_fatal = None  # fn(message): the engine cannot step again (a tensor-parallel worker died)
        self._thread = threading.Thread(target=self._run, name="qwen35-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Sequences accepted but not yet scheduled (queued adds count their n, plus the scheduler's waiting list,
        where each of a request's n completions is one sequence)."""
        return self._num_pending_adds + len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        return len(self.engine.scheduler.running)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def structured(self):
        """The engine's StructuredOutputs: constraints compile there (thread-safe), off the engine's thread."""
        return self.engine.structured

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, mm=None) -> RequestStream:
        """Queue a request and wait until the engine accepted it; raises the engine's error (e.g. EngineError)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = RequestStream(self, request_id, queue)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            n = params.n
            self._num_pending_adds += n
            self._commands.append(("add", request_id, list(prompt_token_ids), params, prompt, mm, loop, queue, n))
            self._cond.notify()
        try:
            first = await queue.get()
        except BaseException:
            stream.abort()
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        assert first is _ADDED
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; leaving the loop early (or being cancelled) aborts the request."""
        stream = await self.add_request(request_id, prompt_token_ids, params, prompt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _send(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished):
            del self._streams[request_id]
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._streams.pop(request_id, None)

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self._streams.pop(command[1], None)
            self.engine.abort(command[1])
            return
        _, request_id, ids, params, prompt, mm, loop, queue, n = command
        try:
            self.engine.add_request(request_id, ids, params, prompt, mm=mm)
        except Exception as e:  # delivered to this request only
            loop.call_soon_threadsafe(queue.put_nowait, e)
        else:
            self._streams[request_id] = (loop, queue)
            loop.call_soon_threadsafe(queue.put_nowait, _ADDED)
        finally:
            with self._cond:
                self._num_pending_adds -= n

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not self.engine.has_unfinished_requests():
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                try:
                    self._apply(command)
                except Exception:
                    logger.exception("engine command %s failed", command[:2])
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except WorkerDied as e:  # no later step can run: fail everything, and tell the server
                logger.error("%s", e)
                for request_id in list(self._streams):
                    self._send(request_id, e)
                    self.engine.abort(request_id)
                if self.on_fatal is not None:
                    self.on_fatal(str(e))
                continue
            except Exception as e:
                logger.exception("engine step failed; failing the requests in flight")
                for request_id in list(self._streams):
                    self._send(request_id, RuntimeError(f"engine step failed: {e}"))
                    try:
                        self.engine.abort(request_id)
                    except Exception:
                        logger.exception("abort of %s failed", request_id)
                continue
            for out in outputs:
                self._send(out.request_id, out if out.error is None else RequestFailed(
                    f"request {out.request_id} failed: {out.error}"))
        for request_id in list(self._streams):
            self._send(request_id, RuntimeError("the engine shut down"))
