"""``downpour up --secure``: a throw-away CA, node certificate and token for one run, handed to
every child through ``DOWNPOUR_TLS_*`` / ``DOWNPOUR_TOKEN_FILE`` and used by the launcher's own calls."""

from __future__ import annotations

import os

from downpour.rpc.certs import make_cluster_pki
from downpour.rpc.channel import ChannelConfig


def secure_setup(out: str) -> tuple[dict[str, str], ChannelConfig]:
    """(environment for the children, ChannelConfig for the launcher) of a cluster with mTLS and a token."""
    pki = make_cluster_pki(os.path.join(out, "tls"))
    env = {
        "DOWNPOUR_TLS_CERT": pki["cert"],
        "DOWNPOUR_TLS_KEY": pki["key"],
        "DOWNPOUR_TLS_CLIENT_CA": pki["ca"],
        "DOWNPOUR_TLS_CA": pki["ca"],
        "DOWNPOUR_TOKEN_FILE": pki["token_file"],
    }
    return env, ChannelConfig(ca=pki["ca"], cert=pki["cert"], key=pki["key"], token=pki["token"])
