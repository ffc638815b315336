"""An OpenAI-compatible fake inference server for tests and throughput benchmarks.

batchd forwards every batch line to an upstream; to test retries, rate limiting and
deduplication without a model (or a bill) we need an upstream whose behaviour we can
script and whose every reply we can predict. The text it returns says plainly that it
is not a model's: ``"[batchd FakeUpstream, not a model] echo: <last user message>"``.

Replies are shaped like OpenAI's. ``id``/``created`` are random/current like the real
ones, everything else (``choices``, ``output``, ``data``, ``usage``) is a pure function
of the request body: :func:`expected_content` recomputes the text a test should see.

Server-wide faults (``configure(**kw)``, or ``POST /_fake/config``): ``latency``,
``failure_rate`` + ``failure_status``, ``rpm`` (token bucket, OpenAI-style 429 and
``x-ratelimit-*`` headers), ``max_concurrency``, outage (503 until a monotonic time),
``seed`` for a reproducible failure sequence.

Per-request overrides, read from the top level of the JSON body (NOT OpenAI fields; a
batch line's ``body`` reaches us verbatim, so tests put them there):

* ``"fake_status": 4xx|5xx`` -- answer that status (``invalid_request_error``, code
  ``fake_error``) after any latency.
* ``"fake_latency": seconds`` -- extra delay for this request only.
* ``"fake_hold": true`` -- while the server-wide ``hold`` setting is true, wait until it
  is set false (``configure(hold=False)``): a gate that keeps chosen requests in flight so a
  test can look at a batch mid-run. ``stats()["held"]`` counts the requests waiting.
* ``"fake_fail_times": N`` -- the first N attempts of this exact body (sha1 of the raw
  bytes; add a unique field such as ``custom_id`` to tell bodies apart) that get past
  outage and rate limits fail with 500 (code ``fake_fail_times``), later ones succeed.

Order of checks: outage (503), max_concurrency (429), rpm (429), JSON/``model``
validation (400), hold, latency, ``fake_status``, ``fake_fail_times``, ``failure_rate``.

Control endpoints (not counted in stats, no faults): ``GET /health``, ``GET
/_fake/stats[?digests=1]``, ``GET|POST /_fake/config`` (body: configure kwargs plus
``"outage_seconds"``), ``POST /_fake/reset``. JSON stats have string status keys.

Hot path is deliberately plain (orjson, hand-built dicts, no logging, no middleware)
because benchmarks drive it at thousands of requests per second on two cores.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import signal
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
from aiohttp import web

__all__ = [
    "FakeUpstream",
    "FakeUpstreamHandle",
    "run_fake_upstream",
    "expected_content",
    "estimate_tokens",
    "fake_embedding",
    "body_digest",
    "FAKE_PREFIX",
]

FAKE_PREFIX = "[batchd FakeUpstream, not a model] echo: "
MODELS = ("fake-model", "gpt-4o-mini", "text-embedding-3-small", "omni-moderation-latest")
_JSON = "application/json"
_CONFIG_KEYS = frozenset(
    {
        "latency",
        "failure_rate",
        "failure_status",
        "rpm",
        "burst_seconds",
        "seed",
        "outage_until",
        "max_concurrency",
        "hold",
    }
)
_MOD_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# Shared, never mutated: every moderation result is identical.
_MOD_RESULT = {
    "flagged": False,
    "categories": {c: False for c in _MOD_CATEGORIES},
    "category_scores": {c: 0.0 for c in _MOD_CATEGORIES},
}
_T = TypeVar("_T")
_id_rng = random.Random()  # ids must look random even when the fault rng is seeded


def _hex(n: int = 24) -> str:
    return f"{_id_rng.getrandbits(n * 4):0{n}x}"


# ----------------------------------------------------------------- deterministic content
def estimate_tokens(text: str) -> int:
    """Cheap deterministic token estimate (no tokenizer: benchmarks can't afford one)."""
    return len(text) // 4 + 1


def body_digest(raw: bytes) -> str:
    """Hex sha1 of raw request bytes: the key of stats' per-body bookkeeping."""
    return hashlib.sha1(raw).hexdigest()


def fake_embedding(text: str) -> list[float]:
    """Unit-length 8-float vector derived from sha256(text): stable across runs."""
    vals = struct.unpack("<8i", hashlib.sha256(text.encode()).digest())
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


def _text_of(content: Any) -> str:
    """Text of a message content: a string or a list of ``{"type", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _last_user(items: Any) -> str:
    if not isinstance(items, list):
        return _text_of(items)
    msgs = [m for m in items if isinstance(m, dict)]
    for m in reversed(msgs):
        if m.get("role") == "user":
            return _text_of(m.get("content"))
    return _text_of(msgs[-1].get("content")) if msgs else ""


def _all_chars(items: Any) -> int:
    if not isinstance(items, list):
        return len(_text_of(items))
    return sum(len(_text_of(m.get("content"))) + 1 for m in items if isinstance(m, dict))


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return str(prompt[-1])
    return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def _endpoint(path: str) -> str:
    return path.removeprefix("/").removeprefix("v1/").strip("/")


def _limit(body: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _generate(body: dict[str, Any], ep: str) -> tuple[str, int, int, bool]:
    """(text, prompt_tokens, completion_tokens, truncated) for a text endpoint."""
    if ep == "chat/completions":
        src, chars = body.get("messages"), _all_chars(body.get("messages"))
        user, limit = _last_user(src), _limit(body, "max_completion_tokens", "max_tokens")
    elif ep == "completions":
        user = _prompt_text(body.get("prompt", ""))
        chars, limit = len(user), _limit(body, "max_tokens")
    elif ep == "responses":
        user = _last_user(body.get("input", ""))
        chars = _all_chars(body.get("input", "")) + len(_text_of(body.get("instructions")))
        limit = _limit(body, "max_output_tokens")
    else:
        raise ValueError(f"no generated text for endpoint {ep!r}")
    text = FAKE_PREFIX + user[:200]
    completion = estimate_tokens(text)
    if limit is not None and completion > limit:
        return text[: limit * 4], chars // 4 + 1, limit, True
    return text, chars // 4 + 1, completion, False


def expected_content(body: dict[str, Any], path: str) -> str:
    """The generated text a reply to ``body`` on ``path`` carries (chat, completions,
    responses; ``path`` may be ``/v1/chat/completions`` or ``chat/completions``)."""
    return _generate(body, _endpoint(path))[0]


# ----------------------------------------------------------------------- reply builders
def _chat(body: dict[str, Any], model: str, digest: str) -> dict[str, Any]:
    text, p, c, trunc = _generate(body, "chat/completions")
    return {
        "id": f"chatcmpl-{_hex()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if trunc else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_batchd_fake",
    }


def _completion(body: dict[str, Any], model: str, digest: str) -> dict[str, Any]:
    text, p, c, trunc = _generate(body, "completions")
    fr = "length" if trunc else "stop"
    return {
        "id": f"cmpl-{_hex()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": fr}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }


def _response(body: dict[str, Any], model: str, digest: str) -> dict[str, Any]:
    text, p, c, trunc = _generate(body, "responses")
    return {
        "id": f"resp_{_hex(32)}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if trunc else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if trunc else None,
        "instructions": body.get("instructions"),
        "model": model,
        "max_output_tokens": body.get("max_output_tokens"),
        # Item id derived from the body so that ``output`` is fully deterministic.
        "output": [
            {
                "type": "message",
                "id": f"msg_{digest[:32]}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c,
        },
    }


def _inputs(raw: Any) -> list[str]:
    """Embedding/moderation ``input``: str, list of str, token list(s) -> list of texts."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [" ".join(map(str, raw))]
    if isinstance(raw, list):
        return [x if isinstance(x, str) else " ".join(map(str, x)) for x in raw]
    return [str(raw)]


def _embeddings(body: dict[str, Any], model: str, digest: str) -> dict[str, Any]:
    texts = _inputs(body.get("input"))
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, t in enumerate(texts):
        vec: Any = fake_embedding(t)
        if b64:
            vec = base64.b64encode(struct.pack("<8f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = sum(estimate_tokens(t) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _moderations(body: dict[str, Any], model: str, digest: str) -> dict[str, Any]:
    n = len(_inputs(body.get("input")))
    return {"id": f"modr-{_hex()}", "model": model or "omni-moderation-latest", "results": [_MOD_RESULT] * n}


_BUILDERS: dict[str, tuple[Callable[[dict[str, Any], str, str], dict[str, Any]], str]] = {
    # endpoint -> (builder, required field besides ``model``)
    "chat/completions": (_chat, "messages"),
    "completions": (_completion, "prompt"),
    "responses": (_response, ""),
    "embeddings": (_embeddings, "input"),
    "moderations": (_moderations, "input"),
}


def _fmt_duration(s: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` style: ``20ms``, ``1.5s``, ``1m30s``."""
    if s < 1:
        return f"{math.ceil(s * 1000)}ms"
    if s < 60:
        return f"{round(s, 3):g}s"
    return f"{int(s // 60)}m{round(s % 60, 3):g}s"


# --------------------------------------------------------------------------- the server
class FakeUpstream:
    """The fake server. Use ``async with FakeUpstream(...) as fu`` inside a running loop,
    :meth:`start_in_thread` from sync code, or :func:`run_fake_upstream` from the CLI.
    Methods are not thread-safe: from other threads go through the handle."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        failure_rate: float = 0.0,
        failure_status: int = 500,
        rpm: int | None = None,
        burst_seconds: float = 1.0,
        seed: int | None = None,
        outage_until: float = 0.0,
        max_concurrency: int | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.latency, self.failure_rate, self.failure_status = 0.0, 0.0, 500
        self.rpm: int | None = None
        self.burst_seconds, self.seed, self.outage_until = 1.0, seed, 0.0
        self.max_concurrency: int | None = None
        self.hold = False
        self._held: list[asyncio.Future[None]] = []
        self._rng = random.Random(seed)
        self._tokens, self._last_refill = 0.0, time.monotonic()
        self._runner: web.AppRunner | None = None
        self._in_flight = 0
        self.configure(
            latency=latency,
            failure_rate=failure_rate,
            rpm=rpm,
            failure_status=failure_status,
            burst_seconds=burst_seconds,
            outage_until=outage_until,
            max_concurrency=max_concurrency,
        )
        self.reset_stats()

    # -- configuration and counters
    def configure(self, **kw: Any) -> dict[str, Any]:
        """Change fault settings at runtime; returns the resulting :meth:`config`."""
        unknown = set(kw) - _CONFIG_KEYS
        if unknown:
            raise TypeError(f"unknown FakeUpstream settings: {sorted(unknown)}")
        if not 0.0 <= float(kw.get("failure_rate", 0.0)) <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        for k in ("rpm", "max_concurrency"):
            if kw.get(k) is not None and int(kw[k]) < 1:
                raise ValueError(f"{k} must be >= 1 or None")
        for k, v in kw.items():
            setattr(self, k, v)
        if "seed" in kw:
            self._rng = random.Random(kw["seed"])
        if not self.hold:
            for waiter in self._held:
                if not waiter.done():
                    waiter.set_result(None)
            self._held.clear()
        if "rpm" in kw or "burst_seconds" in kw:  # new limit: start with a full bucket
            self._tokens, self._last_refill = self._capacity(), time.monotonic()
        return self.config()

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in sorted(_CONFIG_KEYS)}

    def outage(self, seconds: float) -> None:
        """Answer every inference request with 503 for the next ``seconds``."""
        self.outage_until = time.monotonic() + seconds

    def reset_stats(self) -> None:
        """Zero counters and forget body digests and ``fake_fail_times`` attempts."""
        self._requests = self._repeated = 0
        self._by_status: dict[int, int] = {}
        self._by_path: dict[str, int] = {}
        self._by_auth: dict[str, int] = {}  # Authorization header ("" when absent) -> requests
        self._max_in_flight = self._in_flight
        self._success: dict[bytes, int] = {}  # digest -> 200s; key present = body seen
        self._attempts: dict[bytes, int] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self._requests,
            "by_status": dict(self._by_status),
            "by_path": dict(self._by_path),
            "by_authorization": dict(self._by_auth),
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "distinct_bodies": len(self._success),
            "repeated_bodies": self._repeated,
            "held": len(self._held),
        }

    def success_by_digest(self) -> dict[str, int]:
        """{hex sha1 of raw body: number of 200 answers} for bodies answered 200."""
        return {d.hex(): n for d, n in self._success.items() if n}

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        for ep in _BUILDERS:
            r.add_post(f"/v1/{ep}", self._inference_handler(ep))
        r.add_get("/v1/models", self._inference_handler("models"))
        r.add_get("/health", self._health)
        r.add_get("/_fake/stats", self._ctl_stats)
        r.add_get("/_fake/config", self._ctl_config)
        r.add_post("/_fake/config", self._ctl_config)
        r.add_post("/_fake/reset", self._ctl_reset)
        r.add_route("*", "/{tail:.*}", self._not_found)  # 404/405 in OpenAI's envelope
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port, backlog=2048).start()
        except BaseException:  # e.g. port in use: don't leak the runner
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @classmethod
    def start_in_thread(cls, *, use_uvloop: bool = True, **kw: Any) -> FakeUpstreamHandle:
        """Serve from a daemon thread with its own event loop (for sync tests/benches)."""
        fu = cls(**kw)
        loop = _new_loop(use_uvloop)
        ready, failure = threading.Event(), []

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(fu.start())
            except BaseException as e:  # hand the bind error to the caller
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        thread = threading.Thread(target=main, name="batchd-fake-upstream", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return FakeUpstreamHandle(fu, loop, thread)

    # -- request handling
    def _reply(
        self, status: int, payload: Any, rid: str, extra: dict[str, str] | None = None
    ) -> web.Response:
        headers = {"Content-Type": _JSON, "x-request-id": rid}
        if extra:
            headers.update(extra)
        body = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)  # by_status keys
        return web.Response(status=status, body=body, headers=headers)

    def _error(
        self,
        status: int,
        rid: str,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> web.Response:
        err = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return self._reply(status, err, rid, extra)

    def _capacity(self) -> float:
        return max(1.0, (self.rpm or 0) / 60.0 * self.burst_seconds)

    def _take_token(self, now: float) -> tuple[bool, dict[str, str]]:
        """Continuous token bucket; returns (admitted, x-ratelimit-* headers)."""
        rate, cap = (self.rpm or 1) / 60.0, self._capacity()
        tokens = min(cap, self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._tokens = tokens
        headers = {
            "x-ratelimit-limit-requests": str(self.rpm),
            "x-ratelimit-remaining-requests": str(int(tokens)),
            "x-ratelimit-reset-requests": _fmt_duration((cap - tokens) / rate),
        }
        if not ok:
            wait = (1.0 - tokens) / rate
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return ok, headers

    def _inference_handler(self, ep: str) -> Callable[[web.Request], Coroutine[Any, Any, Any]]:
        async def handler(request: web.Request) -> web.Response:
            self._requests += 1
            self._by_path[request.path] = self._by_path.get(request.path, 0) + 1
            auth = request.headers.get("Authorization", "")
            self._by_auth[auth] = self._by_auth.get(auth, 0) + 1
            raw = await request.read() if ep != "models" else b""
            digest = hashlib.sha1(raw).digest()
            if ep != "models":
                seen = self._success.setdefault(digest, 0)
                self._repeated += seen > 0
            resp = await self._gate(request, ep, raw, digest)
            self._by_status[resp.status] = self._by_status.get(resp.status, 0) + 1
            if resp.status == 200 and ep != "models":  # .get: reset_stats() may have run
                self._success[digest] = self._success.get(digest, 0) + 1
            return resp

        return handler

    async def _gate(self, request: web.Request, ep: str, raw: bytes, digest: bytes) -> web.Response:
        """Outage, concurrency and rate limits: cheap rejections before any parsing."""
        rid, now = f"req_{_hex(32)}", time.monotonic()
        if now < self.outage_until:
            wait = str(max(1, math.ceil(self.outage_until - now)))
            return self._error(
                503,
                rid,
                "The server is temporarily unavailable (fake outage).",
                "server_error",
                "service_unavailable",
                extra={"retry-after": wait},
            )
        mc = self.max_concurrency
        if mc is not None and self._in_flight >= mc:
            return self._error(
                429,
                rid,
                f"Too many concurrent requests (limit {mc}).",
                "requests",
                "rate_limit_exceeded",
                extra={"retry-after": "1"},
            )
        rl: dict[str, str] | None = None
        if self.rpm is not None:
            ok, rl = self._take_token(now)
            if not ok:
                return self._error(
                    429,
                    rid,
                    f"Rate limit reached: limit {self.rpm} requests per minute. Please try again later.",
                    "requests",
                    "rate_limit_exceeded",
                    extra=rl,
                )
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return await self._serve(ep, raw, digest, rid, rl)
        finally:
            self._in_flight -= 1

    async def _serve(
        self, ep: str, raw: bytes, digest: bytes, rid: str, rl: dict[str, str] | None
    ) -> web.Response:
        if ep == "models":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "batchd"} for m in MODELS]
            return self._reply(200, {"object": "list", "data": data}, rid, rl)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return self._error(
                400,
                rid,
                "We could not parse the JSON body of your request: expected a JSON object.",
                "invalid_request_error",
                extra=rl,
            )
        builder, required = _BUILDERS[ep]
        for field in ("model", required) if ep != "moderations" else (required,):
            if field and body.get(field) is None:
                return self._error(
                    400,
                    rid,
                    f"Missing required parameter: '{field}'.",
                    "invalid_request_error",
                    "missing_required_parameter",
                    field,
                    rl,
                )
        while self.hold and body.get("fake_hold") is True:
            waiter = asyncio.get_running_loop().create_future()
            self._held.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._held:
                    self._held.remove(waiter)
        delay = self.latency + _num(body.get("fake_latency"))
        if delay > 0:
            await asyncio.sleep(delay)
        failure = self._injected_failure(body, digest, rid, rl)
        if failure is not None:
            return failure
        return self._reply(200, builder(body, str(body.get("model") or ""), digest.hex()), rid, rl)

    def _injected_failure(
        self, body: dict[str, Any], digest: bytes, rid: str, rl: dict[str, str] | None
    ) -> web.Response | None:
        status = body.get("fake_status")
        if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
            return self._error(
                status,
                rid,
                f"Fake error requested (fake_status={status}).",
                "invalid_request_error",
                "fake_error",
                extra=rl,
            )
        fail_times = body.get("fake_fail_times")
        if isinstance(fail_times, int) and fail_times > 0:
            n = self._attempts[digest] = self._attempts.get(digest, 0) + 1
            if n <= fail_times:
                return self._error(
                    500,
                    rid,
                    f"Fake failure {n} of {fail_times} for this body.",
                    "server_error",
                    "fake_fail_times",
                    extra=rl,
                )
        if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            return self._error(
                self.failure_status,
                rid,
                "The server had an error while processing your request (fake failure_rate).",
                "server_error",
                "fake_failure",
                extra=rl,
            )
        return None

    # -- control endpoints (never counted, never faulted)
    async def _health(self, request: web.Request) -> web.Response:
        down = time.monotonic() < self.outage_until
        return self._reply(503 if down else 200, {"status": "outage" if down else "ok"}, f"req_{_hex(32)}")

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        out = self.stats()
        if request.query.get("digests") in ("1", "true"):
            out["success_by_digest"] = self.success_by_digest()
        return self._reply(200, out, f"req_{_hex(32)}")

    async def _ctl_config(self, request: web.Request) -> web.Response:
        rid = f"req_{_hex(32)}"
        if request.method == "GET":
            return self._reply(200, self.config(), rid)
        try:
            kw = orjson.loads(await request.read())
            outage = kw.pop("outage_seconds", None)
            cfg = self.configure(**kw)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            return self._error(400, rid, f"bad fake config: {e}", "invalid_request_error")
        if outage is not None:
            self.outage(float(outage))
            cfg["outage_until"] = self.outage_until
        return self._reply(200, cfg, rid)

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return self._reply(200, {"ok": True}, f"req_{_hex(32)}")

    async def _not_found(self, request: web.Request) -> web.Response:
        return self._error(
            404,
            f"req_{_hex(32)}",
            f"Invalid URL ({request.method} {request.path})",
            "invalid_request_error",
            "unknown_url",
        )


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0.0


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


class FakeUpstreamHandle:
    """Thread-safe remote control of a :class:`FakeUpstream` running in its own thread:
    every call is marshalled onto the server's loop, so the hot path needs no locks."""

    def __init__(self, fu: FakeUpstream, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.server, self._loop, self._thread = fu, loop, thread
        self.url, self.base_url = fu.url, fu.base_url

    def _call(self, fn: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        async def call() -> _T:
            return fn(*args, **kw)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        return self._call(self.server.stats)

    def success_by_digest(self) -> dict[str, int]:
        return self._call(self.server.success_by_digest)

    def configure(self, **kw: Any) -> dict[str, Any]:
        return self._call(self.server.configure, **kw)

    def outage(self, seconds: float) -> None:
        self._call(self.server.outage, seconds)

    def reset_stats(self) -> None:
        self._call(self.server.reset_stats)

    def stop(self) -> None:
        """Close the server and its loop; idempotent."""
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> FakeUpstreamHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_fake_upstream(
    host: str = "127.0.0.1", port: int = 8000, *, use_uvloop: bool = True, **kw: Any
) -> None:
    """Blocking entry point for ``batchd fake-upstream``: prints its URL, runs until
    SIGINT/SIGTERM, then shuts down cleanly."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with FakeUpstream(host=host, port=port, **kw) as fu:
            print(f"batchd FakeUpstream (not a model) listening on {fu.base_url}", flush=True)
            await stop.wait()

    with asyncio.Runner(loop_factory=lambda: _new_loop(use_uvloop)) as runner:
        runner.run(main())
