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
With a token, every request needs it (``Authorization: Bearer``, or
``?token=`` once, which sets a cookie); the server refuses to serve a token
over plain HTTP, so a secured service gets the explorer only with TLS.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import grpc
import numpy as np
from aiohttp import BodyPartReader, web
from PIL import Image

from downpour import trained
from downpour.client import NeuronsClient
from downpour.rpc import rights
from downpour.rpc.channel import add_channel_arguments, channel_config_from_args

log = logging.getLogger("downpour.explorer")

MAX_UPLOAD_BYTES = 16 << 20
MAX_TOP_K = 64
MAX_BINS = 200
MAX_STEPS = 1000
MAX_IN_FLIGHT = 8  # questions computed at once; more are answered 429 rather than queued without bound
COOKIE = "downpour_token"
QUERY_METHOD = "/downpour.v1.Neurons/DescribeModel"  # whoever may call this may use the page


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
    """The aiohttp application over a backend."""

    def __init__(
        self,
        backend: Any,
        token: str = "",
        max_in_flight: int = MAX_IN_FLIGHT,
        roles: tuple[tuple[bytes, str], ...] = (),
    ) -> None:
        self.backend = backend
        self.token = token
        # With a roles file the page takes the tokens of the roles that may query the Neurons
        # service (a reader, admin), as the gRPC API does; not the service's own token.
        self.roles = roles
        self.max_in_flight, self.in_flight = max_in_flight, 0

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
        dataset = q.get("dataset", "")
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
        dataset = q.get("dataset", "")
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
    @web.middleware
    async def guard(self, request: web.Request, handler) -> web.StreamResponse:
        given = ""
        if self.token or self.roles:
            given = (
                request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                or request.query.get("token", "")
                or request.cookies.get(COOKIE, "")
            )
            role = rights.role_of(given, self.roles) if self.roles else None
            if self.roles and role is not None and not rights.allowed(role, QUERY_METHOD):
                return web.json_response({"error": f"role {role!r} may not query neurons"}, status=403)
            if (role is None) if self.roles else not hmac.compare_digest(given.encode(), self.token.encode()):
                return web.json_response(
                    {"error": "a token is required (Authorization: Bearer, or ?token=)"}, status=401
                )
        try:
            resp = await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error the page can show
            return _error_response(e)
        if given and "token" in request.query:
            resp.set_cookie(COOKIE, given, httponly=True, secure=request.secure, samesite="Strict")
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
    """The explorer on its own port, in a background thread with its own event loop."""

    def __init__(
        self,
        backend: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        roles: tuple[tuple[bytes, str], ...] = (),
    ) -> None:
        if (token or roles) and not tls_cert:
            raise ValueError(
                "the explorer would send its token in clear: give it TLS (--tls-cert/--tls-key) "
                "or leave its HTTP port off"
            )
        self.explorer = Explorer(backend, token, roles=roles)
        self.host, self.port = host, port
        self.ssl: ssl.SSLContext | None = None
        if tls_cert:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(tls_cert, tls_key or None)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="explorer", daemon=True)

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}/"

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
        self._runner = web.AppRunner(self.explorer.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# -- downpour explore ----------------------------------------------------------------------------


def add_explore_parser(subparsers):
    e = subparsers.add_parser("explore", help="the neuron explorer web page, over a service or a checkpoint")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--addr", help="a running neurons service (gRPC address)")
    g.add_argument("--checkpoint", metavar="PATH", help="a run folder, checkpoint directory or exported file")
    e.add_argument("--host", default="127.0.0.1", help="address the page is served on")
    e.add_argument("--port", type=int, default=8300, help="HTTP port (0: any free port)")
    add_channel_arguments(e)
    e.set_defaults(func=_cmd_explore)
    return e


def _cmd_explore(args) -> int:
    if args.addr:
        backend: Any = NeuronsClient(args.addr, channel_config_from_args(args))
    else:
        try:
            backend = trained.load(args.checkpoint)
        except (OSError, ValueError) as e:
            print(f"downpour explore: {e}", file=sys.stderr)
            return 2
    srv = ExplorerServer(backend, args.host, args.port).start()
    print(f"neuron explorer at {srv.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0
