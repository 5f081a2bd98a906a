"""downpour up shares the cores among its workers' BLAS threads, leaves the other children at the
library's default and a user's choice alone."""

from downpour import config as jobconfig
from downpour.up.cluster import Cluster
from downpour.up.threads import VARIABLES, threads_env


def test_workers_share_the_cores_and_the_rest_keep_the_default():
    assert threads_env("worker", 2, environ={}, ncores=8) == {v: "4" for v in VARIABLES}
    assert threads_env("worker", 3, environ={}, ncores=8) == {v: "2" for v in VARIABLES}
    assert threads_env("worker", 4, environ={}, ncores=2) == {v: "1" for v in VARIABLES}  # never 0
    for role in ("paramserver", "feeder", "coordinator", "neurons"):
        assert threads_env(role, 2, environ={}, ncores=16) == {}


def test_a_users_setting_stands():
    assert threads_env("worker", 2, environ={"OMP_NUM_THREADS": "6"}, ncores=8) == {}
    assert threads_env("worker", 1, environ={"OPENBLAS_NUM_THREADS": "3"}, ncores=8) == {}


def test_the_cluster_gives_each_child_its_share(tmp_path, monkeypatch):
    for v in VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr("downpour.up.threads.cores", lambda: 8)
    cfg = jobconfig.load(None, env={}, overrides={"preset": "tiny", "replicas": 2, "partitions": "1x2"})
    cl = Cluster(cfg, str(tmp_path), resume=False, secure_env={"worker": {"DOWNPOUR_TOKEN_FILE": "t"}})
    w = cl._child("worker-0", "worker", [])
    assert w.extra_env["OPENBLAS_NUM_THREADS"] == "2"  # 8 cores, 4 workers (2 replicas x 2 partitions)
    assert w.extra_env["DOWNPOUR_TOKEN_FILE"] == "t"  # the security variables still reach it
    assert "OMP_NUM_THREADS" not in cl._child("paramserver-0", "paramserver", []).extra_env
