"""--device: cpu runs NumPy; gpu needs CuPy and a CUDA GPU, and says which is missing at start.

The service tests start the real commands in a subprocess; they stop before
serving anything, so no network is involved. "CuPy is missing" is produced by a
``sitecustomize`` that makes ``import cupy`` fail in the child and everything it starts;
"no GPU" is what a machine without one gives (skipped where there is one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from downpour import device as devices
from downpour.optim import OptimizerConfig
from downpour.worker.loop import DownpourLoop, LocalStore


def _cupy_state() -> str:
    try:
        import cupy
    except ImportError:
        return "missing"
    try:
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "no-gpu"
    except Exception:  # noqa: BLE001 - any CUDA or driver failure means no usable GPU
        return "no-gpu"


CUPY = _cupy_state()
NO_CUPY = "--device gpu needs CuPy, which is not installed here"
NO_GPU = "--device gpu found no usable CUDA GPU"


def test_cpu_is_numpy_and_copies_nothing():
    assert devices.array_module("cpu") is np
    blocks = {"a": np.ones(3, np.float32)}
    assert devices.to_device(np, blocks) is blocks
    assert devices.describe(np) == "cpu"


def test_unknown_device_is_refused():
    with pytest.raises(devices.DeviceError, match="--device 'tpu' is unknown; allowed: cpu, gpu"):
        devices.array_module("tpu")


def test_gpu_without_cupy_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(devices.DeviceError, match=NO_CUPY + r".*downpour\[gpu\].*Dockerfile.gpu"):
        devices.array_module("gpu")


@pytest.mark.skipif(CUPY != "no-gpu", reason=f"needs CuPy installed and no GPU (here: {CUPY})")
def test_gpu_without_a_gpu_says_so():
    with pytest.raises(devices.DeviceError, match=NO_GPU + r".*NVIDIA driver.*docker --gpus.*nvidia.com/gpu"):
        devices.array_module("gpu")


def test_to_host_gives_float32_numpy():
    out = devices.to_host({"a": np.arange(3, dtype=np.float64), "b": np.ones(2, np.float32)})
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())
    np.testing.assert_array_equal(out["a"], [0, 1, 2])


def _run(argv: list[str], block_cupy: bool, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if block_cupy:
        # A sitecustomize on PYTHONPATH makes `import cupy` fail in the child and in any process it starts.
        site = tmp_path / "no-cupy"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import sys\nsys.modules['cupy'] = None\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    code = f"import sys; from downpour.cli import main; sys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


SERVICES = {
    "worker": ["serve", "worker", "--coordinator", "127.0.0.1:9", "--port", "0", "--device", "gpu"],
    "neurons": ["serve", "neurons", "--preset", "tiny", "--random-seed", "0", "--port", "0", "--device", "gpu"],
    "up": ["up", "--preset", "tiny", "--steps", "1", "--device", "gpu", "--quiet"],
}


@pytest.mark.parametrize("role", sorted(SERVICES))
@pytest.mark.parametrize("missing", ["cupy", "gpu"])
def test_services_with_device_gpu_stop_at_start_with_the_reason(role, missing, tmp_path):
    if missing == "gpu" and CUPY != "no-gpu":
        pytest.skip(f"needs CuPy installed and no GPU (here: {CUPY})")
    argv = SERVICES[role] + (["--out", str(tmp_path / "run")] if role == "up" else [])
    r = _run(argv, block_cupy=missing == "cupy", tmp_path=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert (NO_CUPY if missing == "cupy" else NO_GPU) in r.stderr, r.stderr[-2000:]
    assert "listening" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    if role == "up":
        assert not (tmp_path / "run").exists(), "up started a cluster for a device it cannot use"


def test_up_refuses_gpu_with_model_parallel_partitions(tmp_path):
    r = _run(
        [
            "up",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--device",
            "gpu",
            "--partitions",
            "1x2",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ],
        block_cupy=False,
        tmp_path=tmp_path,
    )
    assert r.returncode == 2 and "model-parallel partitions (1x2) compute on the CPU only" in r.stderr, r.stderr


class CountingHost:
    """to_host that records each call and copies, as a device-to-host copy would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, grads):
        self.calls += 1
        return devices.to_host(grads)


@pytest.mark.parametrize("n_push", [1, 3])
def test_loop_copies_gradients_to_host_once_per_push(n_push):
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal(4).astype(np.float32)}
    batches = [(rng.standard_normal((2, 4)).astype(np.float32), None) for _ in range(7)]

    def compute(params, x, y):  # loss 0.5 * |x @ w|^2 summed over the batch
        r = x @ params["w"]
        return float(0.5 * r @ r), {"w": (x.T @ r).astype(np.float32)}

    results = {}
    for name, to_host in (("numpy", None), ("device", CountingHost())):
        store = LocalStore(init, OptimizerConfig(lr=0.1, eps=1e-6, initial_accumulator=0.0))
        loop = DownpourLoop(
            compute, store, ["w"], iter(batches), n_fetch=1, n_push=n_push, overlap=False, to_host=to_host
        )
        for step in range(7):
            loop.step(step, first=step == 0)
        loop.close()
        results[name] = store.w["w"]
        if to_host is not None:
            assert to_host.calls == -(-7 // n_push)  # every push, the final partial one included
    np.testing.assert_array_equal(results["device"], results["numpy"])
