"""deploy/compose/secure.yml over docker-compose.yml: mutual TLS, a token per role, each service
holding its own role's token only, and Prometheus scraping over HTTPS. Checked on what
``docker compose config`` / ``docker-compose config`` make of the two files (whichever is here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose/secure.yml"]


def _composes() -> list[list[str]]:
    found = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.fixture(params=_composes() or [None], ids=lambda c: " ".join(c) if c else "none")
def merged(request) -> dict:
    if request.param is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    r = subprocess.run([*request.param, *FILES, "config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> volume (or host path) of a service, in either long or short syntax."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v.get("source", ""), v["target"]
        out[dst] = src
    return out


def test_every_service_holds_the_certificates_the_roles_file_and_its_own_token_only(merged):
    services = merged["services"]
    ours = {n: s for n, s in services.items() if (s.get("command") or [None])[0] == "serve"}
    assert {s["command"][1] for s in ours.values()} == {"coordinator", "paramserver", "feeder", "worker", "neurons"}
    for name, svc in ours.items():
        role, env, mounts = svc["command"][1], svc["environment"], _mounts(svc)
        assert env["DOWNPOUR_TLS_CLIENT_CA"] and env["DOWNPOUR_TLS_CERT"] and env["DOWNPOUR_ROLES_FILE"], name
        assert mounts["/etc/downpour/tls"].endswith("tls"), name
        token_dir = env["DOWNPOUR_TOKEN_FILE"].rsplit("/", 1)[0]
        assert mounts[token_dir].endswith(f"token-{role}"), (name, mounts)
        tokens = [src for src in mounts.values() if "token-" in src or src.endswith("operator")]
        assert len(tokens) == 1, (name, tokens)  # no other role's token, no operator's
        assert svc["depends_on"]["credentials"]["condition"] == "service_completed_successfully", name
    assert "/var/lib/downpour" in _mounts(services["neurons"])  # the base file's volumes are kept
    prom = _mounts(services["prometheus"])
    assert prom["/etc/prometheus/client"].endswith("metrics-client")
    assert prom["/etc/prometheus/prometheus.yml"].endswith("deploy/compose/prometheus-secure.yml")
    issued = services["credentials"]["entrypoint"]
    names = set(issued[issued.index("--names") + 1].split(","))
    dialled = {n for n in ours if n != "worker-gpu"} | {"127.0.0.1", "localhost"}
    assert dialled <= names, dialled - names


def test_prometheus_scrapes_every_downpour_target_over_https_with_its_client_certificate():
    secure = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus-secure.yml").read_text())
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in secure["scrape_configs"]}
    for job in plain["scrape_configs"]:
        s = jobs[job["job_name"]]
        assert {k: v for k, v in s.items() if k not in ("scheme", "tls_config")} == job  # the same targets
        if job["job_name"] != "prometheus":
            assert s["scheme"] == "https" and s["tls_config"]["cert_file"].startswith("/etc/prometheus/client/")
