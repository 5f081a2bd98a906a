"""Network specs: strict validation with messages naming the setting, presets, `downpour model`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from downpour.nn import FilterSpec, LCNSpec, Network, NetworkSpec, PoolSpec, StageSpec, from_dict, presets, to_dict
from downpour.nn.summary import summarize

REPO = Path(__file__).resolve().parents[2]


def _base():
    return {
        "input": [1, 12, 12],
        "stages": [
            {
                "filter": {"maps": 4, "field": 5, "stride": 1, "tied": False},
                "pool": {"size": 3, "stride": 1, "kind": "l2", "eps": 0.01},
                "lcn": {"size": 3, "sigma": 0.0, "eps": 1e-4},
                "lam": 0.1,
            }
        ],
        "classes": 0,
    }


def _bad(path, value):
    d = _base()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


def test_from_dict_round_trip():
    spec = from_dict(_base())
    assert spec.input == (1, 12, 12)
    assert spec.stages[0].filter == FilterSpec(maps=4, field=5)
    assert spec.stages[0].pool == PoolSpec(size=3, stride=1, kind="l2", eps=0.01)
    assert spec.stages[0].lcn == LCNSpec(size=3)
    assert from_dict(to_dict(spec)) == spec
    assert spec.to_dict() == to_dict(spec)
    # YAML writes 1 for 1.0: ints are accepted for float settings
    assert from_dict(_bad(("stages", 0, "lam"), 1)).stages[0].lam == 1.0


def test_from_dict_null_parts_and_defaults():
    d = {"input": [2, 10, 10], "stages": [{"filter": {"maps": 2, "field": 3}, "pool": None, "lcn": None}]}
    spec = from_dict(d)
    assert spec.stages[0].pool is None and spec.stages[0].lcn is None
    assert spec.stages[0].lam == StageSpec().lam
    # preset specs survive the round trip too
    for name in presets.names():
        assert from_dict(presets.get(name).to_dict()) == presets.get(name)


@pytest.mark.parametrize(
    "path,value,match",
    [
        # geometry
        (("stages", 0, "filter", "field"), 13, r"stages\[1\]\.filter\.field=13 is out of range; allowed: 1\.\.12"),
        (("stages", 0, "filter", "stride"), 0, r"stages\[1\]\.filter\.stride=0 is out of range"),
        (("stages", 0, "filter", "stride"), 6, r"stages\[1\]\.filter\.stride=6 .*allowed: 1\.\.5"),
        (("stages", 0, "filter", "maps"), 0, r"stages\[1\]\.filter\.maps=0"),
        (("stages", 0, "pool", "size"), 9, r"stages\[1\]\.pool\.size=9 .*allowed: 1\.\.8"),  # 12-5+1 = 8 left
        (("stages", 0, "pool", "stride"), 0, r"stages\[1\]\.pool\.stride=0"),
        (("stages", 0, "pool", "stride"), 4, r"stages\[1\]\.pool\.stride=4"),
        (("stages", 0, "pool", "eps"), 0.0, r"stages\[1\]\.pool\.eps=0\.0 .*allowed: > 0"),
        (
            ("stages", 0, "pool", "kind"),
            "median",
            r"stages\[1\]\.pool\.kind='median' is unknown; allowed: l2, max, avg",
        ),
        (("stages", 0, "lcn", "size"), 4, r"stages\[1\]\.lcn\.size=4 must be odd"),
        (("stages", 0, "lcn", "size"), 0, r"stages\[1\]\.lcn\.size=0"),
        (("stages", 0, "lcn", "sigma"), -1.0, r"stages\[1\]\.lcn\.sigma=-1\.0"),
        (("stages", 0, "lcn", "eps"), 0.0, r"stages\[1\]\.lcn\.eps"),
        (("stages", 0, "lam"), -0.1, r"stages\[1\]\.lam=-0\.1"),
        (("input",), [1, 0, 12], r"input\.height=0"),
        (("input",), [1, 12], r"model\.input must be \[channels, height, width\]"),
        (("classes",), -1, r"classes=-1"),
        (("stages",), [], r"stages must list at least one stage"),
        # unknown keys
        (
            ("stages", 0, "filter", "fields"),
            3,
            r"model\.stages\[1\]\.filter: unknown key\(s\) 'fields'; allowed: maps, field",
        ),
        (("stages", 0, "pooling"), {}, r"model\.stages\[1\]: unknown key\(s\) 'pooling'"),
        (("epochs",), 3, r"model: unknown key\(s\) 'epochs'"),
        # wrong types
        (("stages", 0, "filter", "field"), 2.5, r"stages\[1\]\.filter\.field must be an integer, got float"),
        (("stages", 0, "filter", "maps"), "8", r"stages\[1\]\.filter\.maps must be an integer, got str"),
        (("stages", 0, "filter", "maps"), True, r"stages\[1\]\.filter\.maps must be an integer, got bool"),
        (("stages", 0, "filter", "tied"), "yes", r"model\.stages\[1\]\.filter\.tied must be true or false"),
        (("stages", 0, "pool", "kind"), 2, r"model\.stages\[1\]\.pool\.kind must be a string"),
        (("stages", 0, "lam"), "0.1", r"model\.stages\[1\]\.lam must be a number"),
        (("stages", 0, "lcn", "sigma"), True, r"model\.stages\[1\]\.lcn\.sigma must be a number"),
        (("stages", 0, "filter"), 5, r"model\.stages\[1\]\.filter must be a mapping, got int"),
        (("stages",), {"a": 1}, r"model\.stages must be a list"),
    ],
)
def test_from_dict_rejects(path, value, match):
    with pytest.raises(ValueError, match=match):
        from_dict(_bad(path, value))


def test_errors_name_the_right_stage():
    d = _base()
    d["stages"].append({"filter": {"maps": 2, "field": 9}, "pool": None, "lcn": None})
    # stage 1 leaves 8x8 after its filter (12-5+1) and 6x6 after pooling: 9 does not fit
    with pytest.raises(ValueError, match=r"stages\[2\]\.filter\.field=9 .*allowed: 1\.\.6"):
        from_dict(d)
    d["stages"][1] = {"filter": None, "pool": None, "lcn": None}
    with pytest.raises(ValueError, match=r"stages\[2\] has no filter, pool or lcn"):
        from_dict(d)
    with pytest.raises(ValueError, match="model must be a mapping"):
        from_dict([1, 2])


def test_dataclass_specs_validate_on_construction():
    with pytest.raises(ValueError, match=r"stages\[1\]\.filter\.field"):
        NetworkSpec(input=(1, 8, 8), stages=(StageSpec(filter=FilterSpec(field=9)),))
    with pytest.raises(ValueError, match=r"stages\[1\]\.pool\.kind"):
        NetworkSpec(input=(1, 8, 8), stages=(StageSpec(filter=FilterSpec(field=3), pool=PoolSpec(size=2, kind="sum")),))
    with pytest.raises(ValueError, match=r"stages\[1\]\.lcn\.size=2 must be odd"):
        NetworkSpec(input=(1, 8, 8), stages=(StageSpec(filter=None, pool=None, lcn=LCNSpec(size=2)),))
    with pytest.raises(ValueError, match=r"input must be"):
        NetworkSpec(input=[1, 8, 8])
    with pytest.raises(ValueError, match=r"stages\[1\] must be a stage"):
        NetworkSpec(input=(1, 8, 8), stages=({"filter": None},))
    # a field exactly the size of the input, and a pool of the whole map, are fine
    spec = NetworkSpec(
        input=(1, 8, 8),
        stages=(StageSpec(filter=FilterSpec(field=8, maps=2), pool=PoolSpec(size=1), lcn=LCNSpec(size=1)),),
    )
    assert Network(spec).out_shape == (2, 1, 1)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: tiny"):
        presets.get("huge")


# ------------------------------------------------------------------ counts and the CLI


def _hand_count(input_chw, stages, decoders=False):
    """Encoder connections, and parameters (with untied decoders when ``decoders``), from
    (maps, field, stride, pool) tuples."""
    c, h, w = input_chw
    connections = 0
    for maps, field, stride, pool in stages:
        h, w = (h - field) // stride + 1, (w - field) // stride + 1
        connections += h * w * maps * field * field * c  # untied: one weight per location, map and input
        c = maps
        h, w = h - pool + 1, w - pool + 1  # pool stride 1
    return connections, (2 if decoders else 1) * connections


def _model_json(name):
    exe = REPO / ".venv" / "bin" / "downpour"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "downpour.cli"]
    res = subprocess.run(
        cmd + ["model", "--preset", name, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_model_json_tiny_counts():
    info = _model_json("tiny")
    # tiny: 1x16x16 -> 5x5 filters (12x12x4) -> pool 3 (10x10) -> 3x3 filters (8x8x4) -> pool 3 (6x6)
    #       -> 3x3 filters (4x4x4) -> pool 2 (3x3)
    conns, params = _hand_count((1, 16, 16), [(4, 5, 1, 3), (4, 3, 1, 3), (4, 3, 1, 2)])
    assert conns == 12 * 12 * 4 * 25 + 8 * 8 * 4 * 36 + 4 * 4 * 4 * 36 == 25920
    assert info["connections"] == conns
    assert info["total_parameters"] == params
    net = Network(presets.get("tiny"))
    assert sum(net.block_sizes().values()) == params
    names = [layer["name"] for layer in info["layers"]]
    assert names == [f"stage{i}.{part}" for i in (1, 2, 3) for part in ("filter", "pool", "lcn")]
    byname = {layer["name"]: layer for layer in info["layers"]}
    assert byname["stage1.filter"]["out_shape"] == [4, 12, 12]
    assert byname["stage1.filter"]["connections"] == 14400
    assert byname["stage2.pool"]["out_shape"] == [4, 6, 6]
    assert byname["stage3.lcn"]["out_shape"] == [4, 3, 3]
    assert sum(layer["parameters"] for layer in info["layers"]) == params
    assert info["input"] == [1, 16, 16]


def test_model_json_le2012_is_about_a_billion_connections():
    info = _model_json("le2012")
    conns, params = _hand_count((3, 200, 200), [(8, 18, 1, 5)] * 3)
    assert info["connections"] == conns
    assert 0.9e9 <= info["connections"] <= 1.5e9
    assert info["total_parameters"] == params
    assert [layer["out_shape"] for layer in info["layers"] if layer["name"].endswith(".pool")] == [
        [8, 179, 179],
        [8, 158, 158],
        [8, 137, 137],
    ]


def test_summary_counts_head_and_tied_layers():
    spec = NetworkSpec(
        input=(2, 9, 9),
        classes=4,
        stages=(
            StageSpec(
                filter=FilterSpec(maps=3, field=3, tied=True), pool=PoolSpec(size=2, stride=2, kind="max"), lcn=None
            ),
        ),
    )
    info = summarize(spec)
    # tied: 7x7 locations share one 3x3x2 -> 3 weight set; the head sees 3x3x3 features
    assert info["connections"] == 7 * 7 * 3 * 18
    assert info["total_parameters"] == 3 * 18 + 4 * 27 + 4  # the default decoder: W1's transpose
    assert sum(Network(spec).block_sizes().values()) == info["total_parameters"]
    free = dataclasses.replace(spec, stages=(dataclasses.replace(spec.stages[0], constraint="free"),))
    assert summarize(free)["total_parameters"] == 2 * 3 * 18 + 4 * 27 + 4 == sum(Network(free).block_sizes().values())
    assert info["layers"][0]["kind"] == "conv" and info["layers"][1]["kind"] == "max_pool"
    assert info["layers"][-1]["kind"] == "softmax"


def test_model_unknown_preset_exits_2():
    exe = REPO / ".venv" / "bin" / "downpour"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "downpour.cli"]
    res = subprocess.run(cmd + ["model", "--preset", "nope", "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unknown preset 'nope'" in res.stderr


def test_network_builds_every_small_preset():
    for name in ("tiny", "small"):
        net = Network(presets.get(name))
        params = net.init_params(0)
        x = np.zeros((1, *presets.get(name).input), dtype=np.float32)
        acts = net.forward(params, x)
        assert acts[f"stage{len(net.stages)}.output"].shape == (1, *net.out_shape)
