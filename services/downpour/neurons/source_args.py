"""The parameter source a ``downpour serve neurons`` command line names, and how it reaches its peers.

``add_arguments`` adds the one-source flags (``--coordinator``, ``--shards``,
``--checkpoint-dir``, ``--params``, ``--random-seed``) and the ``--peer-*``
flags for calling the coordinator and the shards; ``make_source`` builds the
``downpour.neurons.sources.Source`` they name. Kept apart from the servicer so
that the service's RPC code does not also carry the coordinator's protocol.
"""

from __future__ import annotations

import argparse
from types import ModuleType

import numpy as np

from downpour import config as jobconfig
from downpour.neurons import sources
from downpour.rpc.channel import ChannelConfig, open_channel, read_token
from downpour.rpc.server import ServerConfig
from downpour.v1 import coordinator_pb2, coordinator_pb2_grpc


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags that choose one parameter source (and how to reach live ones)."""
    g = ap.add_argument_group("parameters (one source)")
    g.add_argument("--coordinator", default="", help="a running job's coordinator: its shards, spec and checkpoints")
    g.add_argument("--shards", default="", help="comma-separated parameter shard addresses (live parameters)")
    g.add_argument("--checkpoint-dir", default="", help="committed checkpoints; with live shards: for checkpoint_id")
    g.add_argument("--params", default="", help=".npz file of named parameter blocks")
    g.add_argument("--random-seed", type=int, default=None, help="serve a seeded random initialisation")
    g.add_argument("--peer-ca", default="", help="PEM CA of the coordinator and shards (TLS)")
    g.add_argument("--peer-cert", default="", help="PEM client certificate for them (mutual TLS)")
    g.add_argument("--peer-key", default="", help="PEM client key for them (mutual TLS)")
    g.add_argument("--peer-token-file", default="", help="bearer token the coordinator and shards expect")


def channel_config(args: argparse.Namespace) -> ChannelConfig:
    """How this service calls the coordinator and the shards (TLS and token as they require).

    Without ``--peer-*`` flags it calls them as every other service calls its
    peers: with its own CA, certificate and token (``DOWNPOUR_TLS_*``, as
    ``downpour up --secure`` sets them).
    """
    if not (args.peer_ca or args.peer_cert or args.peer_key or args.peer_token_file):
        return ServerConfig.from_args(args).channel_config()
    token = read_token(args.peer_token_file) if args.peer_token_file else ""
    return ChannelConfig(
        max_message_bytes=args.max_message_bytes, ca=args.peer_ca, cert=args.peer_cert, key=args.peer_key, token=token
    )


def make_source(args: argparse.Namespace, xp: ModuleType = np) -> sources.Source:
    """The one parameter source the flags name; ValueError when they name none or several."""
    backend = "numpy" if xp is np else "cupy"
    chosen = [
        n
        for n, v in (
            ("--coordinator", args.coordinator),
            ("--shards", args.shards),
            ("--params", args.params),
            ("--random-seed", args.random_seed is not None),
        )
        if v
    ]
    if len(chosen) > 1:
        raise ValueError(f"choose one parameter source, got {', '.join(chosen)}")
    if args.coordinator:
        with open_channel(args.coordinator, channel_config(args)) as ch:
            st = coordinator_pb2_grpc.CoordinatorStub(ch).JobStatus(
                coordinator_pb2.JobStatusRequest(), timeout=10.0, wait_for_ready=True
            )
        cfg = jobconfig.from_yaml(st.job.spec_yaml)
        return sources.ShardSource(
            list(st.shard_addresses),
            cfg,
            args.checkpoint_dir or st.job.checkpoint_dir,
            channel_config=channel_config(args),
            backend=backend,
            hold=args.hold_encoder,
        )
    if args.shards:
        cfg = sources.job_config_from(args.config, args.preset)
        return sources.ShardSource(
            [s for s in args.shards.split(",") if s],
            cfg,
            args.checkpoint_dir,
            channel_config=channel_config(args),
            backend=backend,
            hold=args.hold_encoder,
        )
    cfg = sources.job_config_from(args.config, args.preset)
    kw = dict(
        normalize=cfg.normalize,
        data=cfg.data,
        checkpoint_dir=args.checkpoint_dir,
        backend=backend,
        hold=args.hold_encoder,
    )
    if args.params:
        return sources.npz_source(args.params, cfg.network_spec(), **kw)
    if args.random_seed is not None:
        return sources.random_source(cfg.network_spec(), args.random_seed, **kw)
    if args.checkpoint_dir:
        return sources.CheckpointSource(args.checkpoint_dir, backend=backend, hold=args.hold_encoder)
    raise ValueError("no parameters: give --coordinator, --shards, --checkpoint-dir, --params or --random-seed")


def parse_datasets(values: list[str]) -> dict[str, str]:
    """``--dataset NAME=PATH`` flags as {name: path}; ValueError naming a malformed one."""
    out = {}
    for d in values:
        name, sep, path = d.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--dataset {d!r} must be NAME=PATH")
        out[name] = path
    return out
