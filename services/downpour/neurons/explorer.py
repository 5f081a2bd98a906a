"""The neuron explorer: a small web page over a trained network (aiohttp).

    downpour serve neurons --checkpoint-dir runs/a/checkpoints --http-port 8300   # beside the gRPC API
    downpour explore --addr 127.0.0.1:7300                  # over a running neurons service (gRPC)
    downpour explore --checkpoint runs/a                    # a run folder or exported file, in process

Pick a layer and a unit: its optimal stimulus, its top inputs as thumbnails
and the histogram of its activations over a dataset; drop an image: the
layer's activation maps. The page (``explorer.html``) calls a JSON API:

    GET  /api/model                                   layers, input, source, datasets
    GET  /api/stimulus?layer=L&map=M&y=Y&x=X[&steps=]
    GET  /api/top?layer=L&map=M&y=Y&x=X[&dataset=&k=]
    GET  /api/histogram?layer=L&map=M&y=Y&x=X[&dataset=&bins=]
    POST /api/maps?layer=L                            body: an encoded image of any size

The backend is anything with the methods of ``downpour.trained.TrainedNetwork``
(that class itself, over live or checkpoint parameters, or a
``downpour.client.NeuronsClient``). Bad input is answered 400 with
``{"error": ...}`` naming the problem; bodies over ``MAX_UPLOAD_BYTES`` 413.
At most ``MAX_IN_FLIGHT`` questions are computed at once (more: 429).

Access, however the explorer starts (``guard``, ``neurons.access``): a Host other than the bound
address, the loopback names or an ``--allow-host`` name gets 403 (DNS rebinding); a request without
the explorer's own session token (made at start, printed once in its URL; ``?token=`` sets an
HttpOnly, SameSite=Strict cookie holding it) gets 401. The service's bearer token stays in this
process for the gRPC calls. ``dataset=`` is a name the backend lists, never a path. Where the
service has a token the page is not served in clear (``serve neurons``: at all; ``explore --addr``:
beyond loopback).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import secrets
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

import grpc
import numpy as np
from aiohttp import BodyPartReader, web
from PIL import Image

from downpour.neurons.access import WILDCARD_HOSTS, allowed_hosts, host_allowed

log = logging.getLogger("downpour.explorer")

MAX_UPLOAD_BYTES = 16 << 20
MAX_TOP_K = 64
MAX_BINS = 200
MAX_STEPS = 1000
MAX_IN_FLIGHT = 8  # questions computed at once; more are answered 429 rather than queued without bound
COOKIE = "downpour_explorer"  # + "_PORT": cookies are not kept apart by port, two explorers on one host are


class BadRequest(ValueError):
    pass


def _fields(result: Any, *names: str) -> dict[str, Any]:
    """The named attributes of a result, under the same names in the page's JSON."""
    return {n: getattr(result, n) for n in names}


def _b64png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def map_pngs(values: np.ndarray, shape: tuple[int, int, int]) -> list[dict]:
    """A layer's activations (one image) as one grey PNG per map, each min-max scaled on its own."""

    c, h, w = shape
    out = []
    for m, a in enumerate(np.asarray(values, np.float64).reshape(c, h, w)):
        lo, hi = float(a.min()), float(a.max())
        u8 = np.round((a - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="PNG")
        out.append({"map": m, "png": _b64png(buf.getvalue()), "min": lo, "max": hi, "mean": float(a.mean())})
    return out


def _error_response(e: Exception) -> web.Response:
    """What a failed question is to the browser: 400 for bad input, 404 for unknown things, 503 otherwise."""
    if isinstance(e, grpc.RpcError):
        code = {
            grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.UNAUTHENTICATED: 401,
        }.get(e.code(), 503)
        return web.json_response({"error": f"{e.code().name}: {e.details()}"}, status=code)
    if isinstance(e, (BadRequest, ValueError, TypeError)):
        return web.json_response({"error": str(e)}, status=400)
    if isinstance(e, KeyError):
        return web.json_response({"error": str(e.args[0] if e.args else e)}, status=404)
    log.exception("explorer request failed")
    return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=503)


class Explorer:
    """The aiohttp application over a backend; ``token`` is its session token (never a service's)."""

    def __init__(
        self,
        backend: Any,
        token: str,
        *,
        hosts: frozenset[str] = frozenset(),
        cookie: str = COOKIE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        if not token:
            raise ValueError("the explorer needs a session token")
        self.backend = backend
        self.token = token
        self.hosts, self.cookie = hosts, cookie
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self._datasets: frozenset[str] | None = None

    # -- request parsing ----------------------------------------------------------------
    @staticmethod
    def _int(q, name: str, default: int | None = None, lo: int = 0, hi: int | None = None) -> int:
        raw = q.get(name)
        if raw is None or raw == "":
            if default is None:
                raise BadRequest(f"{name} is required")
            return default
        try:
            v = int(raw)
        except ValueError:
            raise BadRequest(f"{name}={raw!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise BadRequest(f"{name}={v} is out of range; allowed: {lo}..{hi if hi is not None else ''}")
        return v

    def _unit(self, q) -> tuple[str, tuple[int, int, int]]:
        layer = q.get("layer", "")
        if not layer:
            raise BadRequest("layer is required")
        return layer, (self._int(q, "map"), self._int(q, "y"), self._int(q, "x"))

    async def _dataset(self, q) -> str:
        """The ``dataset=`` of a question: "" (the job's data) or a name the backend lists, never a path."""
        name = q.get("dataset", "")
        if name == "":
            return ""
        if self._datasets is None or name not in self._datasets:  # first use, or the list changed
            self._datasets = frozenset((await self._call(self.backend.describe)).datasets)
        if name not in self._datasets:
            allowed = ", ".join(repr(n) for n in sorted(self._datasets))
            raise BadRequest(f"unknown dataset {name!r}; allowed: {allowed} (empty: the job's data)")
        return name

    async def _call(self, fn: Callable[[], Any]) -> Any:
        # the math (or a gRPC call) blocks: keep it off the event loop, and bound how much runs at once
        if self.in_flight >= self.max_in_flight:
            raise web.HTTPTooManyRequests(
                text='{"error": "busy: too many questions at once; try again"}', content_type="application/json"
            )
        self.in_flight += 1  # only the event loop's thread touches the count
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        finally:
            self.in_flight -= 1

    # -- handlers -------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("downpour.neurons").joinpath("explorer.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html")

    async def model(self, request: web.Request) -> web.Response:
        d = await self._call(self.backend.describe)
        return web.json_response(
            {
                "layers": [{"name": l.name, "shape": list(l.shape)} for l in d.layers],
                "input_shape": list(d.input_shape),
                **_fields(d, "source", "parameters_version", "checkpoint_id", "step", "normalize", "datasets"),
            }
        )

    async def stimulus(self, request: web.Request) -> web.Response:
        q = request.query
        layer, unit = self._unit(q)
        steps = self._int(q, "steps", 100, 1, MAX_STEPS)
        s = await self._call(lambda: self.backend.optimal_stimulus(layer, unit, steps=steps))
        return web.json_response(
            {
                "png": _b64png(s.png),
                **_fields(s, "activation", "random_activation_max", "random_activation_mean", "parameters_version"),
            }
        )

    async def top(self, request: web.Request) -> web.Response:
        q = request.query
        layer, unit = self._unit(q)
        k = self._int(q, "k", 16, 1, MAX_TOP_K)
        dataset = await self._dataset(q)
        top = await self._call(lambda: self.backend.top_inputs(layer, unit, dataset=dataset, k=k, thumbnails=True))
        return web.json_response(
            {
                "inputs": [
                    {
                        "example_id": t.example_id,
                        "activation": t.activation,
                        "label": t.label,
                        "png": _b64png(t.thumbnail_png),
                    }
                    for t in top
                ]
            }
        )

    async def histogram(self, request: web.Request) -> web.Response:
        q = request.query
        layer, unit = self._unit(q)
        bins = self._int(q, "bins", 30, 1, MAX_BINS)
        dataset = await self._dataset(q)
        h = await self._call(lambda: self.backend.activation_histogram(layer, unit, dataset=dataset, bins=bins))
        return web.json_response(
            {
                "edges": [float(e) for e in h.edges],
                "counts": [int(c) for c in h.counts],
                "examples_scanned": h.examples_scanned,
            }
        )

    async def maps(self, request: web.Request) -> web.Response:
        layer = request.query.get("layer", "")
        if not layer:
            raise BadRequest("layer is required")
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            part = await reader.next()
            # the first part's bytes; a nested multipart is not an image
            data = await part.read() if isinstance(part, BodyPartReader) else b""
        else:
            data = await request.read()
        if not data:
            raise BadRequest("no image: send the encoded image as the request body")
        a = await self._call(lambda: self.backend.activations([bytes(data)], layer))
        return web.json_response(
            {
                "layer": layer,
                "shape": list(a.layer_shape),
                "maps": map_pngs(a.values[0], a.layer_shape),
                "parameters_version": a.parameters_version,
            }
        )

    # -- the application ----------------------------------------------------------------------
    def _has_token(self, request: web.Request) -> bool:
        want = self.token.encode()
        given = (
            request.cookies.get(self.cookie, ""),
            request.query.get("token", ""),
            request.headers.get("Authorization", "").removeprefix("Bearer ").strip(),
        )
        # every one compared, in constant time; a non-ASCII one cannot be the token
        ok = [hmac.compare_digest(g.encode("utf-8", "replace"), want) for g in given]
        return any(ok)

    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        host = request.headers.get("Host", "").strip().lower()
        if not host_allowed(host, self.hosts):
            return web.json_response(
                {"error": f"Host {host!r} is not served here; allow it with --allow-host (serve: --http-allow-host)"},
                status=403,
            )
        if not self._has_token(request):
            return web.json_response(
                {"error": "the explorer's session token is required: open the URL it printed at start (?token=...)"},
                status=401,
            )
        try:
            resp = await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error the page can show
            return _error_response(e)
        query_token = request.query.get("token", "").encode("utf-8", "replace")
        if hmac.compare_digest(query_token, self.token.encode()) and request.cookies.get(self.cookie) != self.token:
            # the session token, never the service's: the service token stays in this process
            resp.set_cookie(self.cookie, self.token, httponly=True, secure=request.secure, samesite="Strict", path="/")
        return resp

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD_BYTES, middlewares=[self.guard])
        app.add_routes(
            [
                web.get("/", self.page),
                web.get("/api/model", self.model),
                web.get("/api/stimulus", self.stimulus),
                web.get("/api/top", self.top),
                web.get("/api/histogram", self.histogram),
                web.post("/api/maps", self.maps),
            ]
        )
        return app


class ExplorerServer:
    """The explorer on its own port, in a background thread with its own event loop.

    ``session_token`` is what the browser must show (a new random one when empty); ``tls_required``
    refuses plain HTTP (a service with a token). The service's token is the backend's affair and is
    never given here."""

    def __init__(
        self,
        backend: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        session_token: str = "",
        tls_required: bool = False,
        tls_cert: str = "",
        tls_key: str = "",
        allow_hosts: tuple[str, ...] = (),
    ) -> None:
        if tls_required and not tls_cert:
            raise ValueError(
                "the explorer would send its token in clear: give it TLS (--tls-cert/--tls-key) "
                "or leave its HTTP port off"
            )
        self.session_token = session_token or secrets.token_urlsafe(32)
        self.explorer = Explorer(backend, self.session_token)
        self.host, self.port = host, port
        self.allow_hosts = tuple(allow_hosts)
        self.ssl: ssl.SSLContext | None = None
        if tls_cert:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(tls_cert, tls_key or None)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="explorer", daemon=True)

    @property
    def url(self) -> str:
        host = self.host if self.host not in WILDCARD_HOSTS else "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}/"

    @property
    def login_url(self) -> str:
        """The URL with the session token, to print once: opening it sets the session cookie."""
        return f"{self.url}?token={self.session_token}"

    def start(self) -> ExplorerServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        # bind here, so that port 0 gives a port we can tell the user
        sock = socket.create_server(
            (self.host, self.port), family=socket.AF_INET6 if ":" in self.host else socket.AF_INET, reuse_port=False
        )
        self.port = sock.getsockname()[1]
        self.explorer.hosts = allowed_hosts(self.host, self.port, self.allow_hosts, 443 if self.ssl else 80)
        self.explorer.cookie = f"{COOKIE}_{self.port}"
        self._runner = web.AppRunner(self.explorer.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def print_url(srv: ExplorerServer, given: bool, suffix: str = "") -> None:
    """The URL to open, with the session token once (not when the token was given: the caller has it)."""
    url = f"{srv.url} (with the session token given)" if given else srv.login_url
    print(f"neuron explorer at {url}{suffix}", file=sys.stderr, flush=True)
