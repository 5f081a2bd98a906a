"""``downpour explore``: the neuron explorer over a running neurons service or a network on disk.

    downpour explore --addr 127.0.0.1:7300 [--token-file F]          # in front of a service (gRPC)
    downpour explore --checkpoint runs/a [--dataset NAME=PATH ...]   # a run folder or exported file

Prints the page's URL once, with its session token (``neurons.access``). Over a service that needs
a token the page is not served in clear beyond loopback (``--https-cert``/``--https-key``: HTTPS);
over a checkpoint it scans only the bundled datasets and those named here, never a path.
"""

from __future__ import annotations

import hmac
import ssl
import sys
import time
from typing import Any

from downpour import trained
from downpour.client import NeuronsClient
from downpour.neurons.access import add_access_arguments, is_loopback, session_token
from downpour.neurons.explorer import ExplorerServer, print_url
from downpour.neurons.source_args import parse_datasets
from downpour.rpc.channel import add_channel_arguments, channel_config_from_args


def add_explore_parser(subparsers):
    e = subparsers.add_parser("explore", help="the neuron explorer web page, over a service or a checkpoint")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--addr", help="a running neurons service (gRPC address)")
    g.add_argument("--checkpoint", metavar="PATH", help="a run folder, checkpoint directory or exported file")
    e.add_argument("--host", default="127.0.0.1", help="address the page is served on")
    e.add_argument("--port", type=int, default=8300, help="HTTP port (0: any free port)")
    e.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="with --checkpoint: another dataset the page may scan, by NAME (repeatable); "
        "a service scans the datasets it was started with",
    )
    e.add_argument("--https-cert", default="", metavar="PEM", help="serve the page over HTTPS with this certificate")
    e.add_argument("--https-key", default="", metavar="PEM", help="the key of --https-cert")
    add_access_arguments(e)
    add_channel_arguments(e)
    e.set_defaults(func=_cmd_explore)
    return e


def _cmd_explore(args) -> int:
    def fail(msg: str) -> int:
        print(f"downpour explore: {msg}", file=sys.stderr)
        return 2

    try:
        token, given = session_token(args.session_token_file)
        extra = parse_datasets(args.dataset)
    except (OSError, ValueError) as e:
        return fail(str(e))
    tls_required = False
    if args.addr:
        if extra:
            return fail("--dataset is for --checkpoint: a service scans the datasets it was started with")
        cfg = channel_config_from_args(args)
        if cfg.token and hmac.compare_digest(cfg.token.encode(), token.encode()):
            return fail("the session token must not be the service's token (the browser holds the session token)")
        # the browser's session token would cross the network in clear, in front of a secured service
        tls_required = bool(cfg.token) and not is_loopback(args.host)
        if tls_required and not args.https_cert:
            return fail(
                f"the service has a token: serve the page over HTTPS (--https-cert/--https-key) or on a "
                f"loopback --host, not in clear on {args.host}"
            )
        backend: Any = NeuronsClient(args.addr, cfg)
    else:
        try:
            backend = trained.load(args.checkpoint)
        except (OSError, ValueError) as e:
            return fail(str(e))
        # the page names datasets; it never reads a path the browser gives
        backend.allow_paths = False
        backend.extra_datasets.update(extra)
    try:
        srv = ExplorerServer(
            backend,
            args.host,
            args.port,
            session_token=token,
            tls_required=tls_required,
            tls_cert=args.https_cert,
            tls_key=args.https_key,
            allow_hosts=tuple(args.allow_host),
        ).start()
    except (OSError, ValueError, ssl.SSLError) as e:
        return fail(str(e))
    if not srv.ssl and not is_loopback(args.host):
        print(
            f"downpour explore: warning: the page is served in clear on {args.host}: its session token "
            "crosses the network unencrypted (--https-cert/--https-key serve HTTPS)",
            file=sys.stderr,
        )
    print_url(srv, given, " (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0
