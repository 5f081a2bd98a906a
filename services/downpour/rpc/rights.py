"""Roles, the rights table (which role may call which RPC) and the roles file.

Every process holds the bearer token of one role and sends only that; a server knows the
roles by a *roles file* of SHA-256 digests, so it holds no other role's token in clear:

    # role        sha256 of the role's token (hex)
    coordinator   5f0c...e1
    worker        9a41...07

Each line is ``<role> <hex digest>``; ``#`` starts a comment; a role may appear on more than
one line (two tokens while one is rotated out). ``downpour up --secure`` writes one
(``write_role_credentials``); any other deployment can make it with ``sha256sum``.

``RIGHTS`` is the one place that says who calls what, read off the code of each caller:

- the coordinator sets up and checkpoints the shards (InitBlocks, SetOptimizer, Checkpoint,
  Restore, ListBlocks);
- workers train: Pull/Push (and their shared-memory twins) on the shards, a stream of batches
  from the feeder, Register/Heartbeat/ReportProgress/Deregister on the coordinator, and the
  halo Exchange with the other partitions of their replica;
- the neurons service, which decodes untrusted images, only reads: ListBlocks and Pull on the
  shards (never a write) and JobStatus to find them;
- a reader (a query client, the explorer) may call the Neurons service and nothing else;
- the parameter shards and the feeder call nobody;
- admin (the ``downpour`` CLI, ``downpour up``'s launcher) may call everything.

A downpour method missing from the table is denied to every role (a unit test checks the table
against every method of the generated descriptors). Health and reflection are open to every
authenticated role. One shared ``--token-file`` without a roles file is one credential with
every right, as before roles existed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

ADMIN = "admin"
ROLES = ("coordinator", "paramserver", "worker", "feeder", "neurons", "reader", ADMIN)
DOWNPOUR_PACKAGE = "downpour."  # methods of services in this package follow the table

_PS = "/downpour.v1.ParameterServer/"
_COORD = "/downpour.v1.Coordinator/"
_FEEDER = "/downpour.v1.DataFeeder/"
_WORKER = "/downpour.v1.ModelWorker/"
_NEURONS = "/downpour.v1.Neurons/"

# full method name -> the roles (besides admin) that may call it
_CALLERS: dict[str, tuple[str, ...]] = {
    # parameter shards: written by the coordinator (set-up, checkpoints) and the workers (gradients)
    _PS + "CreateBlocks": (),  # ParamClient.init: tools and tests, not a running cluster
    _PS + "InitBlocks": ("coordinator",),
    _PS + "SetOptimizer": ("coordinator",),
    _PS + "Checkpoint": ("coordinator",),
    _PS + "Restore": ("coordinator",),
    _PS + "ListBlocks": ("coordinator", "neurons"),
    _PS + "Pull": ("worker", "neurons"),
    _PS + "Push": ("worker",),
    _PS + "AttachShared": ("worker",),
    _PS + "PushPullShared": ("worker",),
    # the coordinator: workers join and report; the neurons service finds the shards
    _COORD + "Register": ("worker",),
    _COORD + "Deregister": ("worker",),
    _COORD + "Heartbeat": ("worker",),
    _COORD + "ReportProgress": ("worker",),
    _COORD + "JobStatus": ("neurons",),
    _COORD + "CreateCheckpoint": (),
    _COORD + "ListCheckpoints": (),
    # the feeder
    _FEEDER + "StreamBatches": ("worker",),
    _FEEDER + "DatasetInfo": (),
    # workers: the halo exchange between the partitions of one replica
    _WORKER + "Exchange": ("worker",),
    _WORKER + "Status": (),
    # the neurons query service
    _NEURONS + "GetActivations": ("reader",),
    _NEURONS + "TopInputs": ("reader",),
    _NEURONS + "OptimalStimulus": ("reader",),
    _NEURONS + "DescribeModel": ("reader",),
}
RIGHTS: dict[str, frozenset[str]] = {m: frozenset((*roles, ADMIN)) for m, roles in _CALLERS.items()}


def allowed(role: str, method: str) -> bool:
    """May ``role`` call ``method`` ("/package.Service/Method")? Unlisted downpour methods: no."""
    if not method.startswith("/" + DOWNPOUR_PACKAGE):
        return True  # health and reflection: any authenticated role
    return role in RIGHTS.get(method, frozenset())


def digest(token: str) -> bytes:
    """SHA-256 of a token: what a roles file holds (a token is 256 random bits: no need to slow the hash)."""
    return hashlib.sha256(token.encode()).digest()


def read_roles_file(path: str) -> tuple[tuple[bytes, str], ...]:
    """(digest, role) of every line of a roles file; a malformed file stops the service, naming the line."""

    def bad(where: str, why: str) -> SystemExit:
        return SystemExit(f"--roles-file {path}{where}: {why}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise bad("", f"cannot read it ({e.strerror})") from None
    entries: list[tuple[bytes, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise bad(f" line {n}", "expected '<role> <sha256 hex of the token>'")
        role, hexdigest = parts
        if role not in ROLES:
            raise bad(f" line {n}", f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        try:
            d = bytes.fromhex(hexdigest)
        except ValueError:
            d = b""
        if len(d) != 32:
            raise bad(f" line {n}", "the digest is not 64 hex digits (sha256sum of the token file's token)")
        if any(hmac.compare_digest(d, e) for e, _ in entries):
            raise bad(f" line {n}", "this token's digest is listed twice: one token, one role")
        entries.append((d, role))
    if not entries:
        raise bad("", "no role in it (an empty roles file would let nobody in)")
    return tuple(entries)


def role_of(token: str, entries: Iterable[tuple[bytes, str]]) -> str | None:
    """The role whose digest matches ``token``, or None. Every entry is compared, in constant time."""
    got, found = digest(token), None
    for d, role in entries:
        if hmac.compare_digest(got, d):
            found = role
    return found


def write_role_credentials(directory: str | os.PathLike, roles: Iterable[str] = ROLES) -> dict[str, str]:
    """A fresh token per role in ``directory/token-<role>`` (mode 0600) and their digests in
    ``directory/roles``; returns {role: token file} and {"roles_file": path}."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out, lines = {}, ["# role sha256(token): downpour --roles-file"]
    for role in roles:
        path = d / f"token-{role}"
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        out[role] = str(path)
        lines.append(f"{role} {digest(token).hex()}")
    roles_file = d / "roles"
    roles_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out["roles_file"] = str(roles_file)
    return out


def markdown_table() -> str:
    """The rights table as docs/operations.md shows it (a test keeps the two the same)."""
    rows = ["| method | roles allowed (admin may call every method) |", "|---|---|"]
    for method, roles in _CALLERS.items():
        rows.append(f"| `{method.lstrip('/')}` | {', '.join(roles) if roles else 'admin only'} |")
    return "\n".join(rows)
