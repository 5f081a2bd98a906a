"""Who may use the neuron explorer's page: its session token, the Host headers it answers, and their flags.

Kept apart from ``explorer`` (aiohttp) so that ``downpour serve neurons`` can add the flags without
loading the web stack. ``session_token`` reads a given token or makes one per start, as Jupyter
does; ``allowed_hosts`` is the set of ``Host`` headers answered, which stops DNS rebinding: a page
whose name was rebound to this machine still sends its own name.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
from pathlib import Path

TOKEN_ENV = "DOWNPOUR_EXPLORER_TOKEN"
MIN_SESSION_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def session_token(path: str = "", env: dict[str, str] | None = None) -> tuple[str, bool]:
    """The explorer's session token and whether it was given: read from ``path``, else from
    ``DOWNPOUR_EXPLORER_TOKEN``, else a new random one (as Jupyter makes one per start)."""
    if path:
        given = Path(path).read_text(encoding="utf-8").strip()
        what = f"--session-token-file {path}"
    else:
        given = (os.environ if env is None else env).get(TOKEN_ENV, "").strip()
        what = TOKEN_ENV
    if not path and not given:
        return secrets.token_urlsafe(32), False
    if len(given) < MIN_SESSION_TOKEN_CHARS or not given.isascii() or not given.isprintable() or " " in given:
        raise ValueError(
            f"{what}: a session token needs at least {MIN_SESSION_TOKEN_CHARS} printable ASCII characters "
            "and no spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return given, True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_and_port(value: str) -> tuple[str, str]:
    """``name:port``, ``[v6]:port``, ``name`` or ``[v6]`` split into (name, port or "")."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return name + "]", rest.removeprefix(":")
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = (), default_port: int = 80) -> frozenset[str]:
    """The ``Host`` headers the explorer bound to ``host:port`` answers (lower case).

    The loopback names and the bound address, with the port (without it only on the scheme's
    default port); each of ``extra`` (``--allow-host``) as given, and where it has no port also
    with this one. A browser sends the name it looked up: a page whose DNS name was rebound to
    this machine sends its own name, which is none of these."""
    names = set(LOOPBACK_NAMES)
    if host not in WILDCARD_HOSTS:
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    out = {f"{n}:{port}" for n in names}
    if port == default_port:
        out |= names
    for e in extra:
        e = e.strip().lower()
        if not e:
            continue
        name, p = _host_and_port(e)
        out.add(e)
        if not p:
            out.add(f"{name}:{port}")
    return frozenset(h.lower() for h in out)


def add_access_arguments(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """The explorer's own access flags (``prefix``: "http-" beside a service's gRPC flags)."""
    ap.add_argument(
        f"--{prefix}session-token-file",
        default="",
        metavar="FILE",
        help=f"the explorer's session token (default: ${TOKEN_ENV}, else a new random one, printed in its URL)",
    )
    ap.add_argument(
        f"--{prefix}allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host header to answer, as NAME or NAME:PORT (repeatable; default: only the bound "
        "address and localhost, 127.0.0.1, [::1])",
    )


def host_allowed(host: str, hosts: frozenset[str]) -> bool:
    """Whether a request's ``Host`` header (lower case) is answered: one of ``hosts``, or a loopback
    name on any port. A rebound DNS name is never a loopback name, so the port adds nothing against
    rebinding, and a tunnel to another local port (``ssh -L``, ``kubectl port-forward``) just works."""
    return host in hosts or _host_and_port(host)[0] in LOOPBACK_NAMES
