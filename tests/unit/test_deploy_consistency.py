"""docker-compose.yml and deploy/k8s run the same roles, commands and ports.

Renders the kustomize base and every overlay (``kubectl kustomize`` when
kubectl is installed, else a small renderer for the features deploy/k8s uses:
resources, images, JSON 6902 patches; with kubectl both are run and must
agree), validates each against the Kubernetes schemas (kubernetes-validate),
then compares, role by role, the ``downpour serve`` flags of compose and
Kubernetes, the ports their services, probes and Prometheus use.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/gpu", "overlays/secure"]
K8S_VERSION = "1.30"  # the oldest Kubernetes deploy/k8s is validated against (>= 1.28 needed)
ROLES = {"coordinator", "paramserver", "worker", "feeder", "neurons"}
PORTS = {"coordinator": 7070, "paramserver": 7100, "feeder": 7060, "worker": 7050, "neurons": 7300}
METRICS_PORT = 9100
ADDRESS_FLAGS = {"--coordinator", "--feeder", "--shards"}
# Kubernetes-only flags, and why: pod names of a Deployment do not resolve, so
# a worker advertises its pod IP (in compose its container hostname resolves).
K8S_ONLY = {"worker": {"--advertise"}}


# -- a minimal kustomize ------------------------------------------------------------


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json_patch(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if kind not in ("add", "replace", "remove"):
            raise NotImplementedError(f"JSON patch op {kind}")
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[int(last)] = copy.deepcopy(op["value"])
            else:
                del node[int(last)]
        else:
            if kind == "replace" and last not in node:
                raise KeyError(f"replace of a missing {op['path']}")
            if kind == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(op["value"])


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != doc["kind"]:
        return False
    if "name" in target and target["name"] != doc["metadata"]["name"]:
        return False
    for term in filter(None, target.get("labelSelector", "").split(",")):
        k, v = term.split("=", 1)
        if doc["metadata"].get("labels", {}).get(k.strip()) != v.strip():
            return False
    return True


def render_python(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "images", "patches"}
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unknown)}")
    docs: list[dict] = []
    for r in k.get("resources", []):
        p = directory / r
        docs += render_python(p) if p.is_dir() else _load_all(p)
    for patch in k.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        for d in docs:
            if _matches(d, patch.get("target", {})):
                _json_patch(d, ops)
    for img in k.get("images", []):
        for d in docs:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"
    return docs


def render_kubectl(directory: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_key(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    directory = K8S / request.param
    docs = render_python(directory)
    if shutil.which("kubectl"):
        assert _by_key(render_kubectl(directory)) == _by_key(docs), (
            f"kubectl kustomize and the built-in renderer disagree on {request.param}"
        )
    return request.param, docs


# -- reading the two deployments --------------------------------------------------


def _flags(args: list[str]) -> dict[str, str]:
    assert args[0] == "serve", args
    out, rest = {}, [str(a) for a in args[2:]]
    i = 0
    while i < len(rest):
        assert rest[i].startswith("--"), rest
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out[rest[i]] = rest[i + 1]
            i += 2
        else:
            out[rest[i]] = ""
            i += 1
    return out


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_roles(profiles: tuple[str, ...] = ()) -> dict[str, list[tuple[str, dict]]]:
    """role -> [(service name, flags)] for the downpour services (default profile)."""
    out: dict[str, list] = {}
    for name, svc in compose()["services"].items():
        cmd = svc.get("command") or []
        if cmd[:1] != ["serve"] or (svc.get("profiles") and not set(svc["profiles"]) & set(profiles)):
            continue
        out.setdefault(cmd[1], []).append((name, _flags(cmd)))
    return out


def k8s_roles(docs: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """role -> [(workload, flags)]."""
    out: dict[str, list] = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert "command" not in c, f"{d['metadata']['name']}: keep the image's entrypoint (use args)"
        out.setdefault(c["args"][1], []).append((d, _flags(c["args"])))
    return out


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -- the checks ----------------------------------------------------------------------


def test_manifests_validate_against_kubernetes_schemas(rendered, tmp_path):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    name, docs = rendered
    for d in docs:
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")


def test_compose_and_k8s_run_the_same_roles_with_the_same_commands(rendered):
    name, docs = rendered
    c, k = compose_roles(), k8s_roles(docs)
    assert set(c) == ROLES and set(k) == ROLES, (sorted(c), sorted(k))
    job = yaml.safe_load((ROOT / "deploy" / "compose" / "job.yaml").read_text())
    for role in ROLES:
        kflags_all = [f for _, f in k[role]]
        assert len(kflags_all) == 1, f"{role}: one workload per role in k8s"
        kflags = kflags_all[0]
        for svc, cflags in c[role]:
            extra = set(kflags) - set(cflags)
            allowed = K8S_ONLY.get(role, set())
            if name.endswith("secure"):
                allowed = allowed | {
                    "--tls-cert",
                    "--tls-key",
                    "--tls-ca",
                    "--tls-client-ca",
                    "--roles-file",
                    "--token-file",
                }
            if name.endswith("gpu") and role == "worker":
                allowed = allowed | {"--device"}
            assert extra <= allowed, f"{role}: only k8s passes {sorted(extra - allowed)}"
            missing = set(cflags) - set(kflags)
            assert not missing, f"{role}: only compose ({svc}) passes {sorted(missing)}"
            for flag, value in cflags.items():
                if flag in ADDRESS_FLAGS:
                    cp = [_port_of(a) for a in value.split(",")]
                    kp = [_port_of(a) for a in kflags[flag].split(",")]
                    assert cp == kp, f"{role} {flag}: compose {value} vs k8s {kflags[flag]}"
                elif flag != "--shard-index":
                    assert kflags[flag] == value, f"{role} {flag}: compose {value!r} vs k8s {kflags[flag]!r}"
            assert int(cflags["--port"]) == PORTS[role] and int(cflags["--metrics-port"]) == METRICS_PORT
    # Two shards, indices 0..n-1 in compose; the StatefulSet's ordinal in k8s.
    shard_idx = sorted(int(f["--shard-index"]) for _, f in c["paramserver"])
    ps = k["paramserver"][0][0]
    assert shard_idx == list(range(ps["spec"]["replicas"])) == list(range(job["shards"]))
    assert k["paramserver"][0][1]["--shard-index"] == "$(SHARD_INDEX)"
    assert len(c["coordinator"][0][1]["--shards"].split(",")) == len(k["coordinator"][0][1]["--shards"].split(","))
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "downpour-job")
    assert yaml.safe_load(cm["data"]["job.yaml"]) == job, "the k8s job ConfigMap and deploy/compose/job.yaml differ"


def test_ports_agree_across_services_probes_and_prometheus(rendered):
    name, docs = rendered
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for role, items in k8s_roles(docs).items():
        for d, flags in items:
            c = d["spec"]["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"grpc": PORTS[role], "metrics": METRICS_PORT}, (role, ports)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c[probe]
                if "grpc" in p:
                    assert p["grpc"]["port"] == PORTS[role], (role, probe)
                else:
                    assert name.endswith("secure") and "healthcheck.py" in " ".join(p["exec"]["command"])
            sec = c["securityContext"]
            assert sec["readOnlyRootFilesystem"] and sec["capabilities"]["drop"] == ["ALL"]
            assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
            for flag in ADDRESS_FLAGS & set(flags):
                for addr in flags[flag].split(","):
                    host = addr.rsplit(":", 1)[0].split(".")[-1]
                    svc = services[host]
                    assert _port_of(addr) in [p["port"] for p in svc["spec"]["ports"]], (role, flag, addr)
    for role in ROLES - {"worker"}:
        svc_ports = {p["name"]: p["port"] for p in services[role]["spec"]["ports"]}
        assert svc_ports == {"grpc": PORTS[role], "metrics": METRICS_PORT}, (role, svc_ports)
    assert services["paramserver"]["spec"]["clusterIP"] == "None"


def test_compose_ports_prometheus_and_scaling():
    spec = compose()
    svcs = spec["services"]
    # --scale worker=N: no container_name, no host ports.
    assert "container_name" not in svcs["worker"] and "ports" not in svcs["worker"]
    published = [p.split(":")[-1] for p in svcs["neurons"]["ports"]]
    assert str(PORTS["neurons"]) in published
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    static = {
        t.rsplit(":", 1)[0]: int(t.rsplit(":", 1)[1])
        for job in prom["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    dns = {n: sd["port"] for job in prom["scrape_configs"] for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    for name, svc in svcs.items():
        cmd = svc.get("command") or []
        if cmd[:1] == ["serve"]:
            port = static.get(name, dns.get(name))
            assert port == int(_flags(cmd)["--metrics-port"]), f"Prometheus does not scrape {name}"
        if name != "grafana" and "profiles" not in svc and cmd[:1] == ["serve"]:
            for dep, cond in (svc.get("depends_on") or {}).items():
                assert cond == {"condition": "service_healthy"}, (name, dep)
    assert "checkpoints" in spec["volumes"]
    dash = ROOT / "deploy" / "grafana" / "dashboards" / "downpour.json"
    import json

    assert json.loads(dash.read_text())["panels"]


def test_gpu_profile_and_overlay_run_the_worker_with_device_gpu():
    """compose's gpu profile and the k8s gpu overlay: the CUDA image, one GPU, the worker's flags plus --device gpu."""
    from downpour.neurons.server import build_parser as neurons_parser
    from downpour.worker.server import build_parser as worker_parser

    svcs = compose()["services"]
    gpu, cpu = svcs["worker-gpu"], svcs["worker"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    cflags = _flags(gpu["command"])
    assert cflags["--device"] == "gpu"
    assert {k: v for k, v in cflags.items() if k != "--device"} == _flags(cpu["command"])
    dev = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    ((d, kflags),) = k8s_roles(render_python(K8S / "overlays" / "gpu"))["worker"]
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert kflags["--device"] == "gpu" and c["image"] == "downpour:gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert set(kflags) - K8S_ONLY["worker"] == set(cflags)
    # the worker's own parser takes exactly these flags (and neurons takes --device too)
    assert worker_parser().parse_args([str(a) for a in gpu["command"][2:]]).device == "gpu"
    assert worker_parser().parse_args([str(a) for a in c["args"][2:]]).device == "gpu"
    assert neurons_parser().parse_args(["--device", "gpu"]).device == "gpu"
    # the image: the [gpu] extra on a CUDA runtime base (which ships NVRTC), CuPy's cache on the writable /tmp
    text = (ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    assert '"/src[gpu]"' in text and "ARG BASE_IMAGE=nvidia/cuda:12" in text and "-runtime-" in text
    assert "CUPY_CACHE_DIR=/tmp/" in text and gpu["tmpfs"] == ["/tmp"] and gpu["read_only"]


# Kubernetes: a hung process is replaced after about a minute of silence, never on one slow answer.
K8S_LIVENESS_SECONDS = (45, 120)  # (at least, at most) seconds of silence before the kubelet restarts


def _probe_window(p: dict) -> float:
    """Seconds of unanswered probes before the kubelet acts (the last probe's own timeout included)."""
    return p.get("periodSeconds", 10) * (p.get("failureThreshold", 3) - 1) + p.get("timeoutSeconds", 1)


def test_kubernetes_liveness_is_lenient_and_readiness_is_quick(rendered):
    """On a busy node one slow answer must not restart a shard (it would lose its updates since the
    last checkpoint): liveness waits several probes, about a minute, and stays bounded so that a
    hung process is still replaced; readiness takes a silent pod out of the endpoints far sooner."""
    name, docs = rendered
    low, high = K8S_LIVENESS_SECONDS
    for role, items in k8s_roles(docs).items():
        for d, _ in items:
            c = d["spec"]["template"]["spec"]["containers"][0]
            live, ready = c["livenessProbe"], c["readinessProbe"]
            assert live["failureThreshold"] >= 3, (name, role, live)
            assert low <= _probe_window(live) <= high, (name, role, live)
            assert _probe_window(ready) * 3 <= _probe_window(live), (name, role, ready, live)
            for p in (live, ready):
                if "exec" in p:
                    cmd = p["exec"]["command"]
                    # its own deadline (healthcheck.py's default: 3 s) leaves the interpreter's start-up
                    # inside the probe's
                    own = float(cmd[cmd.index("--timeout") + 1]) if "--timeout" in cmd else 3.0
                    assert own < p["timeoutSeconds"], cmd
            assert "--liveness" in live.get("exec", {}).get("command", ["--liveness"]), live


def test_compose_replaces_a_hung_service_within_the_jobs_hang_deadline():
    """Compose's health check kills a process that stops answering within the same deadline as
    ``downpour up`` (the job's hang_seconds): one machine, as ``downpour up``."""
    from downpour.config import JobConfig

    hang = JobConfig().hang_seconds
    test = compose()["x-downpour"]["healthcheck"]["test"]
    assert float(test[test.index("--kill-hung") + 1]) == hang, test
    ours = [svc for svc in compose()["services"].values() if svc.get("image", "").startswith("${DOWNPOUR")]
    assert len(ours) >= len(ROLES)
    for svc in ours:
        # the check's kill only replaces the process where a restart policy acts on the exit
        assert svc["healthcheck"]["test"] == test and svc.get("restart") in ("unless-stopped", "on-failure"), svc


def _secret_of(path: str, mounts: dict[str, str], secrets: dict[str, str]) -> str:
    """The secret whose volume holds ``path`` in a container (mount path -> volume -> secret)."""
    directory = path.rsplit("/", 1)[0]
    assert directory in mounts, path
    return secrets[mounts[directory]]


def test_the_secure_overlay_is_mutual_tls_and_each_workload_holds_only_its_own_roles_token():
    from downpour.rpc import rights

    docs = render_python(K8S / "overlays" / "secure")
    for role, items in k8s_roles(docs).items():
        ((d, flags),) = items
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}

        # mutual TLS: a server certificate, and clients need one from the CA the servers also trust
        assert flags["--tls-client-ca"] == flags["--tls-ca"], role
        for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
            assert _secret_of(flags[flag], mounts, secrets) == "downpour-tls", (role, flag)
        # its own role's token, the roles file of digests, and no other role's token
        assert _secret_of(flags["--token-file"], mounts, secrets) == f"downpour-token-{role}", role
        assert _secret_of(flags["--roles-file"], mounts, secrets) == "downpour-roles", role
        tokens = {s for s in secrets.values() if s.startswith("downpour-token")}
        assert tokens == {f"downpour-token-{role}"}, (role, tokens)
        assert role in rights.ROLES
        # no flag that would hand the service other credentials for its peers
        assert not {f for f in flags if f.startswith("--peer-")}, role
        # /metrics is HTTPS: Prometheus is told so
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https", role
