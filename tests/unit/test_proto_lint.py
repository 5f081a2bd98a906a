"""The wire contract follows buf's STANDARD lint rules, so it reads well from any language.

The protos are compiled with grpcio-tools' protoc (with source info, for the
comment rules) and the descriptors are checked rule by rule, with buf's rule
names: what buf would report, without its binary. One exception, stated the
way a buf.yaml would: SERVICE_SUFFIX ("...Service"), because a service's name
is part of every method's path (/downpour.v1.Neurons/GetActivations) and
renaming it would break every deployed client. Each rule is also run against
a small bad proto here to show that it fires.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
EXCEPT = {"SERVICE_SUFFIX"}


def upper_snake(name: str) -> str:
    """buf's ToUpperSnakeCase: a word starts at an upper-case letter after a lower-case letter or digit,
    or at the last upper-case letter of a run followed by a lower-case one ("DType" -> "D_TYPE")."""
    out = []
    for i, ch in enumerate(name):
        if (
            ch.isupper()
            and i > 0
            and (name[i - 1].islower() or name[i - 1].isdigit() or (i + 1 < len(name) and name[i + 1].islower()))
        ):
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


def compile_protos(root: Path, files: list[Path], out: Path):
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return list(fds.file)


def _comments(fd) -> dict[tuple, str]:
    return {tuple(loc.path): loc.leading_comments for loc in fd.source_code_info.location}


PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def lint(files) -> list[str]:
    """Every violation of the rules below, as 'RULE file: what'."""
    bad: list[str] = []

    def fail(rule: str, fd, what: str) -> None:
        if rule not in EXCEPT:
            bad.append(f"{rule} {fd.name}: {what}")

    seen_types: dict[str, str] = {}
    for fd in files:
        pkg = fd.package
        if not pkg:
            fail("PACKAGE_DEFINED", fd, "no package")
        if not re.match(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$", pkg):
            fail("PACKAGE_LOWER_SNAKE_CASE", fd, pkg)
        if not re.search(r"\.v\d+((alpha|beta)\d*)?$", pkg):
            fail("PACKAGE_VERSION_SUFFIX", fd, pkg)
        if str(Path(fd.name).parent).replace("/", ".") != pkg:
            fail("PACKAGE_DIRECTORY_MATCH", fd, f"package {pkg} in {Path(fd.name).parent}")
        if not LOWER_SNAKE.match(Path(fd.name).stem):
            fail("FILE_LOWER_SNAKE_CASE", fd, fd.name)
        if fd.public_dependency or fd.weak_dependency:
            fail("IMPORT_NO_PUBLIC", fd, "public or weak import")
        comments = _comments(fd)

        def check_enum(e, path, scope, fd=fd, comments=comments):  # this file's, bound now
            if not PASCAL.match(e.name):
                fail("ENUM_PASCAL_CASE", fd, e.name)
            prefix = upper_snake(e.name) + "_"
            if e.value and e.value[0].number != 0:
                fail("ENUM_FIRST_VALUE_ZERO", fd, f"{e.name}.{e.value[0].name} = {e.value[0].number}")
            if e.value and e.value[0].name != prefix + "UNSPECIFIED":
                fail("ENUM_ZERO_VALUE_SUFFIX", fd, f"{e.name}: zero value {e.value[0].name}, want {prefix}UNSPECIFIED")
            for v in e.value:
                if not UPPER_SNAKE.match(v.name):
                    fail("ENUM_VALUE_UPPER_SNAKE_CASE", fd, v.name)
                if not v.name.startswith(prefix):
                    fail("ENUM_VALUE_PREFIX", fd, f"{e.name}.{v.name} does not start with {prefix}")
            if not comments.get(path, "").strip():
                fail("COMMENT_ENUM", fd, f"{scope}{e.name} has no comment")

        def check_message(m, path, scope, fd=fd):  # this file's, bound now
            if not PASCAL.match(m.name):
                fail("MESSAGE_PASCAL_CASE", fd, m.name)
            for f in m.field:
                if not LOWER_SNAKE.match(f.name):
                    fail("FIELD_LOWER_SNAKE_CASE", fd, f"{m.name}.{f.name}")
            for i, e in enumerate(m.enum_type):
                check_enum(e, path + (4, i), f"{scope}{m.name}.")
            for i, n in enumerate(m.nested_type):
                check_message(n, path + (3, i), f"{scope}{m.name}.")

        for i, e in enumerate(fd.enum_type):
            check_enum(e, (5, i), "")
        for i, m in enumerate(fd.message_type):
            check_message(m, (4, i), "")
        for si, s in enumerate(fd.service):
            if not PASCAL.match(s.name):
                fail("SERVICE_PASCAL_CASE", fd, s.name)
            if not s.name.endswith("Service"):
                fail("SERVICE_SUFFIX", fd, s.name)
            if not comments.get((6, si), "").strip():
                fail("COMMENT_SERVICE", fd, f"service {s.name} has no comment")
            for mi, rpc in enumerate(s.method):
                if not PASCAL.match(rpc.name):
                    fail("RPC_PASCAL_CASE", fd, rpc.name)
                req, resp = rpc.input_type.rsplit(".", 1)[-1], rpc.output_type.rsplit(".", 1)[-1]
                if req not in (f"{rpc.name}Request", f"{s.name}{rpc.name}Request"):
                    fail("RPC_REQUEST_STANDARD_NAME", fd, f"{s.name}.{rpc.name} takes {req}")
                if resp not in (f"{rpc.name}Response", f"{s.name}{rpc.name}Response"):
                    fail("RPC_RESPONSE_STANDARD_NAME", fd, f"{s.name}.{rpc.name} returns {resp}")
                for t in (rpc.input_type, rpc.output_type):
                    if t in seen_types:
                        fail("RPC_REQUEST_RESPONSE_UNIQUE", fd, f"{t} used by {seen_types[t]} and {rpc.name}")
                    seen_types[t] = rpc.name
                if not comments.get((6, si, 2, mi), "").strip():
                    fail("COMMENT_RPC", fd, f"{s.name}.{rpc.name} has no comment")
    return bad


def test_the_contract_passes_the_standard_rules(tmp_path):
    files = sorted((PROTO_ROOT / "downpour" / "v1").glob("*.proto"))
    assert files
    problems = lint(compile_protos(PROTO_ROOT, files, tmp_path / "image.pb"))
    assert not problems, "\n".join(problems)


def test_upper_snake_is_bufs():
    assert upper_snake("DType") == "D_TYPE"
    assert upper_snake("Dtype") == "DTYPE"
    assert upper_snake("OptimizerKind") == "OPTIMIZER_KIND"
    assert upper_snake("HTTPServer") == "HTTP_SERVER"
    assert upper_snake("Layer2Kind") == "LAYER2_KIND"


def test_each_rule_fires_on_a_bad_contract(tmp_path):
    d = tmp_path / "bad" / "v1"
    d.mkdir(parents=True)
    (d / "BadFile.proto").write_text("""syntax = "proto3";
package bad.v1;
enum DType { DTYPE_UNSPECIFIED = 0; DTYPE_FLOAT32 = 1; }
// An enum.
enum Color { RED = 0; }
message foo_message { int32 BadField = 1; }
message GetRequest {}
message GetResponse {}
message Other {}
service Things {
  rpc Get(GetRequest) returns (GetResponse);
  // Documented.
  rpc List(Other) returns (Other);
}
""")
    got = "\n".join(lint(compile_protos(tmp_path, [d / "BadFile.proto"], tmp_path / "bad.pb")))
    for rule, needle in [
        ("ENUM_VALUE_PREFIX", "DType.DTYPE_FLOAT32 does not start with D_TYPE_"),
        ("ENUM_ZERO_VALUE_SUFFIX", "want COLOR_UNSPECIFIED"),
        ("COMMENT_ENUM", "DType has no comment"),
        ("MESSAGE_PASCAL_CASE", "foo_message"),
        ("FIELD_LOWER_SNAKE_CASE", "BadField"),
        ("FILE_LOWER_SNAKE_CASE", "BadFile.proto"),
        ("RPC_REQUEST_STANDARD_NAME", "Things.List takes Other"),
        ("RPC_RESPONSE_STANDARD_NAME", "Things.List returns Other"),
        ("RPC_REQUEST_RESPONSE_UNIQUE", "Other"),
        ("COMMENT_SERVICE", "service Things"),
        ("COMMENT_RPC", "Things.Get has no comment"),
    ]:
        assert f"{rule} " in got and needle in got, (rule, needle, got)
    assert "SERVICE_SUFFIX" not in got  # the one exception, as configured
    assert "COMMENT_RPC bad/v1/BadFile.proto: Things.List" not in got


# -- wire compatibility ------------------------------------------------------------------------
# What buf's `breaking --against` checks in its WIRE_JSON category, against a snapshot of the
# contract kept in tests/unit/proto_wire.json: a field keeps its number, name, type and
# cardinality, an enum value its number and name, an RPC its types and streaming, a service
# its name. Additions pass; after one, refresh the snapshot:
#     .venv/bin/python tests/unit/test_proto_lint.py --update-wire-snapshot
WIRE_SNAPSHOT = Path(__file__).with_name("proto_wire.json")


def wire_table(files) -> dict[str, str]:
    out: dict[str, str] = {}

    def message(m, scope):
        name = f"{scope}.{m.name}"
        for f in m.field:
            out[f"{name}#{f.number}"] = f"{f.name} type={f.type} label={f.label} {f.type_name}".strip()
        for e in m.enum_type:
            enum(e, name)
        for n in m.nested_type:
            message(n, name)

    def enum(e, scope):
        for v in e.value:
            # JSON carries value names; binary the numbers. The enum's own name is neither.
            out[f"{scope}.enum:{v.number}"] = v.name

    for fd in files:
        for m in fd.message_type:
            message(m, fd.package)
        for e in fd.enum_type:
            enum(e, f"{fd.package}.{e.name}")
        for s in fd.service:
            for r in s.method:
                out[f"/{fd.package}.{s.name}/{r.name}"] = (
                    f"{r.input_type} {r.output_type} client_streaming={r.client_streaming} "
                    f"server_streaming={r.server_streaming}"
                )
    return out


def _current_wire(tmp: Path) -> dict[str, str]:
    files = sorted((PROTO_ROOT / "downpour" / "v1").glob("*.proto"))
    return wire_table(compile_protos(PROTO_ROOT, files, tmp / "wire.pb"))


def wire_breaks(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return [f"{k}: {v!r} -> {new.get(k, 'removed')!r}" for k, v in sorted(old.items()) if new.get(k) != v]


def test_the_wire_stays_compatible(tmp_path):
    import json

    broken = wire_breaks(json.loads(WIRE_SNAPSHOT.read_text()), _current_wire(tmp_path))
    assert not broken, "wire-incompatible changes:\n" + "\n".join(broken)


def test_a_renumbered_field_or_renamed_service_is_caught(tmp_path):
    import json
    import shutil

    root = tmp_path / "proto"
    shutil.copytree(PROTO_ROOT, root)
    p = root / "downpour" / "v1" / "neurons.proto"
    p.write_text(
        p.read_text().replace("int32 k = 2;", "int32 k = 9;").replace("service Neurons {", "service NeuronsService {")
    )
    files = sorted((root / "downpour" / "v1").glob("*.proto"))
    broken = "\n".join(
        wire_breaks(json.loads(WIRE_SNAPSHOT.read_text()), wire_table(compile_protos(root, files, tmp_path / "x.pb")))
    )
    assert "downpour.v1.TopInputsRequest#2: 'k type=5 label=1' -> 'removed'" in broken
    assert "/downpour.v1.Neurons/GetActivations" in broken


if __name__ == "__main__" and "--update-wire-snapshot" in sys.argv:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        WIRE_SNAPSHOT.write_text(json.dumps(_current_wire(Path(d)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {WIRE_SNAPSHOT}")
