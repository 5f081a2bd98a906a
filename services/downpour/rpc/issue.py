"""Issue a deployment's credentials once: a CA, a node certificate, a token per role, the roles
file, and the operator's and the metrics scraper's client certificates, each in its own folder
so that each can be mounted alone (deploy/compose/secure.yml runs this in a one-shot service).

    python -m downpour.rpc.issue DIR --names coordinator,feeder,... [--owner 10001:10001]

    DIR/tls/             ca.pem, node.pem, node.key, roles   (every service)
    DIR/token-<role>/    token                                (that role's services only)
    DIR/operator/        ca.pem, client.pem, client.key, token-admin, token-reader
    DIR/metrics/         ca.pem, client.pem, client.key      (the /metrics scraper)

Files are 0600 (certificates 0644), folders 0755, and with ``--owner``/``--metrics-owner`` owned
by the services' and the scraper's users. A DIR that already has ``tls/roles`` is left as it is:
running it again (every ``docker compose up``) keeps the credentials the services hold.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from downpour.rpc import certs, rights

SERVICE_ROLES = ("coordinator", "paramserver", "feeder", "worker", "neurons")
PEOPLE = ("admin", "reader")


def _owner(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    user, _, group = text.partition(":")
    return int(user), int(group or user)


def issue(directory: str | os.PathLike, names: list[str], days: int = 365) -> dict[str, str]:
    """Write the layout above under ``directory`` (only inside its sub-folders, which may each be a
    volume of their own); returns {what: path}."""
    d = Path(directory)
    tls, operator, metrics = d / "tls", d / "operator", d / "metrics"
    for sub in (tls, operator, metrics, *(d / f"token-{r}" for r in SERVICE_ROLES)):
        sub.mkdir(parents=True, exist_ok=True)
    # The CA key stays in memory: nothing signs again (a new deployment issues a new CA).
    ca_cert, ca_key = certs.make_ca("downpour deployment CA", days=days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for folder in (tls, operator, metrics):
        (folder / "ca.pem").write_bytes(ca_pem)
    node_cert, node_key = certs.issue(ca_cert, ca_key, names[0], tuple(names), days=days)
    certs.write_pair(tls, "node", node_cert, node_key)
    for who, folder in (("operator", operator), ("metrics", metrics)):
        cert, key = certs.issue(ca_cert, ca_key, f"downpour-{who}", ("localhost",), days=days)
        certs.write_pair(folder, "client", cert, key)
    lines = ["# role sha256(token): downpour --roles-file"]
    for role in (*SERVICE_ROLES, *PEOPLE):
        path = d / f"token-{role}" / "token" if role in SERVICE_ROLES else operator / f"token-{role}"
        lines.append(f"{role} {rights.digest(certs.write_token(path)).hex()}")
    (tls / "roles").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"tls": str(tls), "operator": str(operator), "metrics": str(metrics), "roles_file": str(tls / "roles")}


def _chown_tree(path: Path, owner: tuple[int, int]) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, *owner)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m downpour.rpc.issue", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="where to write (see the layout above)")
    ap.add_argument("--names", required=True, help="comma-separated DNS names and IPs of the node certificate")
    ap.add_argument("--owner", default="", help="UID[:GID] of the services' user (needs CAP_CHOWN)")
    ap.add_argument("--metrics-owner", default="", help="UID[:GID] of the /metrics scraper's user")
    ap.add_argument("--days", type=int, default=365, help="certificate lifetime")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    if (d / "tls" / "roles").exists():
        print(f"credentials already in {d}: kept")
        return 0
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if not names:
        ap.error("--names: at least one name")
    issue(d, names, args.days)
    for f in d.rglob("*"):  # keys and tokens 0600; write_pair made client/node.pem 0644 already
        f.chmod(0o755 if f.is_dir() else 0o644 if f.suffix == ".pem" else 0o600)
    owner, metrics_owner = _owner(args.owner), _owner(args.metrics_owner) or _owner(args.owner)
    for sub in d.iterdir():
        who = metrics_owner if sub.name == "metrics" else owner
        if who is not None:
            _chown_tree(sub, who)
    print(f"credentials issued in {d}: tls/, token-<role>/ ({', '.join(SERVICE_ROLES)}), operator/, metrics/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
