"""Who may use the neuron explorer, as a hostile client on the same machine or a hostile web page sees it.

Every explorer here is a real process, in each of the three ways one starts: `downpour serve neurons
--http-port` (plain, and with a token and TLS), `downpour explore --checkpoint FILE` and `downpour
explore --addr` in front of a neurons service that needs a token. Each prints the URL to open once,
with its session token; these tests read it from the log as a user reads the terminal.

- without the session token every route (the page, the API, thumbnails, an unknown path) is 401;
- the service's bearer token is never in a Set-Cookie, and opens nothing;
- a Host header other than the bound address, a loopback name (any port) or an --allow-host name is 403
  (DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name);
- `dataset=` takes only the names the explorer lists, never a path (no thumbnails of /etc or a
  folder of the user's images);
- `downpour explore --addr` does not turn a secured service into an open HTTP proxy.
"""

from __future__ import annotations

import io
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness
from downpour import export
from downpour.nn import Network, presets
from downpour.nn.spec import to_dict
from downpour.rpc.certs import make_cluster_pki

UNIT = "layer=stage3.pool&map=0&y=0&x=0"
PNG = Image.new("L", (16, 16))  # an image for POST /api/maps


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    PNG.save(buf, format="PNG")
    return buf.getvalue()


# every route the explorer has, and one it has not: (method, path)
ROUTES = [
    ("GET", ""),
    ("GET", "api/model"),
    ("GET", f"api/stimulus?{UNIT}&steps=1"),
    ("GET", f"api/top?{UNIT}&k=2&dataset=heldout"),
    ("GET", f"api/histogram?{UNIT}&bins=3&dataset=heldout"),
    ("POST", "api/maps?layer=stage3.pool"),
    ("GET", "no/such/page"),
]


class Explorer:
    """A running explorer: its process, base URL, session token and the context its TLS needs."""

    def __init__(self, proc: harness.Proc, context: ssl.SSLContext | None = None, service_token: str = "") -> None:
        self.proc, self.context, self.service_token = proc, context, service_token
        found = harness.wait_for(
            lambda: re.search(r"neuron explorer at (\S+)", proc.text()), 90, "the explorer's URL", procs=[proc]
        )
        login = urllib.parse.urlsplit(found.group(1))
        self.url = f"{login.scheme}://{login.netloc}/"
        self.port = login.port
        self.token = urllib.parse.parse_qs(login.query).get("token", [""])[0]
        harness.wait_for(lambda: harness.accepts(self.port), 60, f"the explorer at {self.url}", procs=[proc])

    def call(
        self, path: str, *, method: str = "GET", headers: dict | None = None, token: bool = False
    ) -> tuple[int, dict, list[str]]:
        """(status, JSON body or {"raw": ...}, Set-Cookie headers) of one request, with the session token
        as a bearer header when ``token``."""
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {self.token}"
        data = _png_bytes() if method == "POST" else None
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120, context=self.context) as r:
                return r.status, _body(r.read()), r.headers.get_all("Set-Cookie") or []
        except urllib.error.HTTPError as e:
            return e.code, _body(e.read()), e.headers.get_all("Set-Cookie") or []


def _body(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        return {"raw": raw.decode(errors="replace")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A network file as `downpour export` writes it (the tiny preset, seeded weights): what
    `downpour explore --checkpoint` opens."""
    spec = presets.get("tiny")
    params = {k: np.asarray(v, np.float32) for k, v in Network(spec).init_params(3).items()}
    meta = {export.PREFIX + "network_spec": json.dumps(to_dict(spec), sort_keys=True)}
    p = tmp_path_factory.mktemp("net") / "tiny.npz"
    with open(p, "wb") as f:
        np.savez(f, **params, **{export.NPZ_METADATA: np.array(json.dumps(meta))})
    return p


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """A folder of the user's own images: a path the page must not be able to name."""
    d = tmp_path_factory.mktemp("private")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / f"private{i}.png")
    return d


@pytest.fixture(scope="module")
def explorers(exported, tmp_path_factory):
    """The explorer started every way, all at once: {kind: Explorer}."""
    tmp = tmp_path_factory.mktemp("explorers")
    pki = make_cluster_pki(tmp / "tls")
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False  # the node certificate names the cluster, not 127.0.0.1
    tiny = ("--random-seed", "0", "--preset", "tiny")
    with harness.Procs(tmp) as procs:
        plain = procs.serve("neurons", *tiny, "--http-port", str(harness.free_port()), wait=False)
        tls = procs.serve(
            "neurons",
            *tiny,
            "--http-port",
            str(harness.free_port()),
            "--token-file",
            pki["token_file"],
            "--tls-cert",
            pki["cert"],
            "--tls-key",
            pki["key"],
            wait=False,
        )
        secured = procs.serve("neurons", *tiny, "--token-file", pki["token_file"])  # its gRPC API only
        checkpoint = procs.cli(
            "explore-checkpoint",
            "explore",
            "--checkpoint",
            str(exported),
            "--port",
            str(harness.free_port()),
        )
        addr = procs.cli(
            "explore-addr",
            "explore",
            "--addr",
            secured.address,
            "--token-file",
            pki["token_file"],
            "--port",
            str(harness.free_port()),
        )
        yield {
            "serve": Explorer(plain),
            "serve-tls": Explorer(tls, ctx, pki["token"]),
            "checkpoint": Explorer(checkpoint),
            "addr": Explorer(addr, service_token=pki["token"]),
        }


KINDS = ["serve", "serve-tls", "checkpoint", "addr"]


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_session_token_every_route_is_refused(explorers, kind):
    e = explorers[kind]
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Cookie": "downpour_token=x"}):
            code, body, cookies = e.call(path, method=method, headers=headers)
            assert code == 401, (method, path, headers, code, body)
            assert "png" not in json.dumps(body) and "inputs" not in body and not cookies
    assert e.call("?token=not-the-session-token")[0] == 401
    # and with it, the same routes answer
    assert e.call("api/model", token=True)[0] == 200
    assert e.call(f"api/top?{UNIT}&k=2&dataset=heldout", token=True)[0] == 200


@pytest.mark.parametrize("kind", ["serve-tls", "addr"])
def test_the_service_token_opens_nothing_and_is_never_in_a_cookie(explorers, kind):
    e = explorers[kind]
    q = urllib.parse.quote(e.service_token)
    for method, path in ROUTES:
        for headers in ({"Authorization": f"Bearer {e.service_token}"}, {}):
            sep = "&" if "?" in path else "?"
            code, body, cookies = e.call(f"{path}{sep}token={q}", method=method, headers=headers)
            assert not any(e.service_token in c for c in cookies), (method, path, cookies)
            assert code == 401, (method, path, code, body)
    assert e.service_token and e.token and e.token != e.service_token
    # the printed URL sets the session cookie: the session token, HttpOnly, SameSite=Strict
    code, body, cookies = e.call(f"?token={urllib.parse.quote(e.token)}")
    assert code == 200 and len(cookies) == 1, (code, cookies)
    assert e.service_token not in cookies[0] and f"={e.token};" in cookies[0]
    assert "HttpOnly" in cookies[0] and "SameSite=Strict" in cookies[0]
    name = cookies[0].split("=", 1)[0]
    # that cookie alone is enough for the API afterwards
    assert e.call("api/model", headers={"Cookie": f"{name}={e.token}"})[0] == 200
    for method, path in ROUTES:
        cookies = e.call(path, method=method, token=True)[2]
        assert not any(e.service_token in c for c in cookies)


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_host_header_is_refused(explorers, kind):
    e = explorers[kind]
    for host in (
        f"evil.example:{e.port}",
        "evil.example",
        f"127.0.0.1.nip.io:{e.port}",
        f"localhost.evil.example:{e.port}",
    ):
        code, body, _ = e.call("api/model", headers={"Host": host}, token=True)
        assert code == 403, (host, code, body)
        assert "Host" in body.get("error", ""), body
    # a loopback name on another port is a local tunnel (ssh -L, kubectl port-forward), not a rebound name
    for host in (f"localhost:{e.port}", f"127.0.0.1:{e.port}", "localhost:9000", "[::1]:9000"):
        assert e.call("api/model", headers={"Host": host}, token=True)[0] == 200, host


def test_allow_host_names_another_host(exported, procs):
    p = procs.cli("explore", "explore", "--checkpoint", str(exported), "--port", "0", "--allow-host", "explorer.test")
    e = Explorer(p)
    assert e.call("api/model", headers={"Host": f"explorer.test:{e.port}"}, token=True)[0] == 200
    assert e.call("api/model", headers={"Host": "explorer.test"}, token=True)[0] == 200
    assert e.call("api/model", headers={"Host": f"other.test:{e.port}"}, token=True)[0] == 403


@pytest.mark.parametrize("kind", KINDS)
def test_a_dataset_is_a_name_never_a_path(explorers, pictures, kind):
    e = explorers[kind]
    for ds in (str(pictures), str(pictures / "private0.png"), "/etc", "/etc/passwd", "../..", "file:///etc"):
        for route in ("top", "histogram"):
            q = urllib.parse.urlencode({"dataset": ds})
            code, body, _ = e.call(f"api/{route}?{UNIT}&k=4&bins=3&{q}", token=True)
            assert code == 400, (route, ds, code, body)
            assert "unknown dataset" in body["error"] and "'heldout'" in body["error"], body
            assert "inputs" not in body and "counts" not in body


def test_a_dataset_given_at_launch_is_offered_and_scanned_by_name(exported, pictures, procs):
    p = procs.cli("explore", "explore", "--checkpoint", str(exported), "--port", "0", "--dataset", f"mine={pictures}")
    e = Explorer(p)
    code, model, _ = e.call("api/model", token=True)
    assert code == 200 and "mine" in model["datasets"] and "heldout" in model["datasets"]
    code, top, _ = e.call(f"api/top?{UNIT}&k=4&dataset=mine", token=True)
    assert code == 200 and len(top["inputs"]) == 4
    code, hist, _ = e.call(f"api/histogram?{UNIT}&bins=3&dataset=mine", token=True)
    assert code == 200 and hist["examples_scanned"] == 6
    # its path is still not a dataset name
    q = urllib.parse.urlencode({"dataset": str(pictures)})
    assert e.call(f"api/top?{UNIT}&k=4&{q}", token=True)[0] == 400


def test_explore_addr_over_a_secured_service_refuses_plain_http_beyond_loopback(procs, tmp_path):
    pki = make_cluster_pki(tmp_path / "tls")
    secured = procs.serve("neurons", "--random-seed", "0", "--preset", "tiny", "--token-file", pki["token_file"])
    p = procs.cli(
        "explore", "explore", "--addr", secured.address, "--token-file", pki["token_file"], "--host", "0.0.0.0"
    )
    assert p.wait(60) == 2 and "--https-cert" in p.text(), p.text()


def test_a_given_session_token_is_used_and_not_printed(exported, procs, tmp_path):
    """Scripted use: the token from a file or DOWNPOUR_EXPLORER_TOKEN; the printed URL leaves it out."""
    f = tmp_path / "session"
    f.write_text("from-a-file-0123456789abcdef\n")
    by_file = procs.cli(
        "explore", "explore", "--checkpoint", str(exported), "--port", "0", "--session-token-file", str(f)
    )
    by_env = procs.cli(
        "explore",
        "explore",
        "--checkpoint",
        str(exported),
        "--port",
        "0",
        env={"DOWNPOUR_EXPLORER_TOKEN": "from-the-environment-0123456789"},
    )
    for p, token in ((by_file, "from-a-file-0123456789abcdef"), (by_env, "from-the-environment-0123456789")):
        e = Explorer(p)
        assert e.token == "" and token not in p.text()
        e.token = token
        assert e.call("api/model", token=True)[0] == 200
        e.token = token[:-1]
        assert e.call("api/model", token=True)[0] == 401


def test_a_short_session_token_or_the_service_token_is_refused_at_start(exported, procs, tmp_path):
    short = tmp_path / "short"
    short.write_text("short\n")
    p = procs.cli("explore", "explore", "--checkpoint", str(exported), "--session-token-file", str(short))
    assert p.wait(60) == 2 and "at least 16" in p.text(), p.text()
    pki = make_cluster_pki(tmp_path / "tls")
    secured = procs.serve("neurons", "--random-seed", "0", "--preset", "tiny", "--token-file", pki["token_file"])
    p = procs.cli(
        "explore",
        "explore",
        "--addr",
        secured.address,
        "--token-file",
        pki["token_file"],
        "--session-token-file",
        pki["token_file"],
    )
    assert p.wait(60) == 2 and "must not be the service's token" in p.text(), p.text()
