"""``downpour up --secure``: a throw-away CA and node certificate for one run, a bearer token per
role (``tls/token-<role>``, mode 0600) and the roles file of their digests (``tls/roles``). Each
child gets, through ``DOWNPOUR_TLS_*`` / ``DOWNPOUR_ROLES_FILE`` / ``DOWNPOUR_TOKEN_FILE``, the
certificates, the roles file and its own role's token only; the launcher's own calls use admin's."""

from __future__ import annotations

import os

from downpour.rpc import rights
from downpour.rpc.certs import make_cluster_pki
from downpour.rpc.channel import ChannelConfig, read_token


def secure_setup(out: str) -> tuple[dict[str, dict[str, str]], ChannelConfig]:
    """({role: environment for its children}, ChannelConfig for the launcher) of a cluster with mTLS
    and a token per role."""
    tls = os.path.join(out, "tls")
    pki = make_cluster_pki(tls, token=False)
    creds = rights.write_role_credentials(tls)
    common = {
        "DOWNPOUR_TLS_CERT": pki["cert"],
        "DOWNPOUR_TLS_KEY": pki["key"],
        "DOWNPOUR_TLS_CLIENT_CA": pki["ca"],
        "DOWNPOUR_TLS_CA": pki["ca"],
        "DOWNPOUR_ROLES_FILE": creds["roles_file"],
    }
    env = {role: {**common, "DOWNPOUR_TOKEN_FILE": creds[role]} for role in rights.ROLES}
    admin = read_token(creds[rights.ADMIN])
    return env, ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=admin)
