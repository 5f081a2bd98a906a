"""Every raw kernel of downpour.kernels compiles with NVRTC, without a GPU.

NVRTC is a library: it compiles for an explicit ``-arch`` with no device or
driver present. CuPy's own compile helpers ask the device for its
architecture, so this calls CuPy's NVRTC binding directly with the options
``CupyLauncher`` uses. Needs ``pip install 'downpour[gpu-build]'`` (CuPy and
the NVRTC wheel, no GPU); skipped with the reason where they are missing.
"""

from __future__ import annotations

import pytest

from downpour.kernels import KERNELS, SOURCE
from downpour.kernels.launch import nvrtc_options

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy is not installed (extra gpu-build)")

try:
    VERSION = nvrtc.getVersion()
    ARCHS = set(nvrtc.getSupportedArchs())
except Exception as e:  # noqa: BLE001 - any failure to load libnvrtc means: cannot check here
    pytest.skip(
        f"NVRTC cannot be loaded ({e}); install nvidia-cuda-nvrtc-cu12 (extra gpu-build)", allow_module_level=True
    )

# V100, A100, H100/H200: the architectures the GPU image is meant for.
WANTED = [70, 80, 90]


def compile_cubin(source: str, real: str, arch: int) -> bytes:
    prog = nvrtc.createProgram(source, "downpour_kernels.cu", (), ())
    try:
        try:
            # --device-as-default-execution-space: as CuPy compiles a RawModule
            nvrtc.compileProgram(
                prog, (*nvrtc_options(real), f"-arch=sm_{arch}", "--device-as-default-execution-space")
            )
        except nvrtc.NVRTCError as e:
            raise AssertionError(f"NVRTC {VERSION} sm_{arch} {real}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("arch", WANTED)
def test_every_kernel_compiles(real, arch):
    if arch not in ARCHS:
        pytest.skip(f"NVRTC {VERSION} cannot target sm_{arch}")
    cubin = compile_cubin(SOURCE, real, arch)
    assert cubin[:4] == b"\x7fELF", "NVRTC returned no cubin"
    for name in KERNELS:  # extern "C": each kernel is an unmangled symbol of the module
        assert name.encode() + b"\x00" in cubin, f"kernel {name} is missing from the sm_{arch} cubin"


def test_a_broken_source_fails_with_the_compiler_log():
    broken = SOURCE.replace("out[t] = acc;", "out[t] = acc", 1)
    with pytest.raises(AssertionError, match='expected a ";"'):
        compile_cubin(broken, "float", 90 if 90 in ARCHS else max(ARCHS))
