"""What `refit.compat.cuda` does around the CUDA calls, against a stand-in for the runtime and driver.

This machine has no GPU; the calls themselves run in tests/gpu/test_cuda_ipc.py. Here, with a
stand-in that keeps a current device, a last error and allocations, the parts that are refit's own:
the caller's device is current again after every call (torch reads it too), a failed call clears the
error it left (torch's next launch check would raise it), a mapping whose size cannot be read is
closed, and each allocation is exported once per publish.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from refit.compat import cuda
from refit.errors import TransportError

BASE = 0x7F00_0000_0000
SIZE = 1 << 21


class FakeRuntime:
    """`libcudart` as refit calls it: a current device, a last error, and IPC handles of allocations."""

    def __init__(self) -> None:
        self.device = 0
        self.last_error = 0
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, int] = {}  # call -> the error code it returns
        self.opened: list[int] = []

    def _result(self, name: str, *args: Any) -> int:
        self.calls.append((name, self.device, *args))
        code = self.fail.get(name, 0)
        if code:
            self.last_error = code
        return code

    def cudaGetDevice(self, ref: Any) -> int:
        ref._obj.value = self.device
        return 0

    def cudaSetDevice(self, device: int) -> int:
        self.device = device
        return 0

    def cudaGetLastError(self) -> int:
        code, self.last_error = self.last_error, 0
        return code

    def cudaGetErrorString(self, code: int) -> bytes:
        return b"invalid argument"

    def cudaIpcGetMemHandle(self, ref: Any, base: ctypes.c_void_p) -> int:
        ctypes.memmove(ref._obj.reserved, (base.value or 0).to_bytes(8, "little") * 8, 64)
        return self._result("get", base.value)

    def cudaIpcOpenMemHandle(self, ref: Any, handle: Any, flags: int) -> int:
        code = self._result("open", flags)
        if not code:
            ref._obj.value = BASE
            self.opened.append(BASE)
        return code

    def cudaIpcCloseMemHandle(self, base: ctypes.c_void_p) -> int:
        self.opened.remove(base.value)
        return self._result("close", base.value)


class FakeDriver:
    """`libcuda`'s `cuMemGetAddressRange_v2` over allocations of SIZE bytes at multiples of SIZE."""

    def __init__(self) -> None:
        self.fail = False

    def cuMemGetAddressRange_v2(self, base: Any, size: Any, addr: ctypes.c_uint64) -> int:
        if self.fail:
            return 1  # CUDA_ERROR_INVALID_VALUE
        base._obj.value = addr.value - addr.value % SIZE
        size._obj.value = SIZE
        return 0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeRuntime, FakeDriver]]:
    rt, drv = FakeRuntime(), FakeDriver()
    monkeypatch.setattr(cuda, "_runtime", lambda: rt)
    monkeypatch.setattr(cuda, "_driver", lambda: drv)
    yield rt, drv


def test_calls_run_on_their_gpu_and_the_callers_device_is_current_after(runtime) -> None:
    rt, _ = runtime
    rt.device = 1  # the caller's (torch's) current device
    exported = cuda.export([(BASE + 0x100, 0), (BASE + 0x200, 0), (BASE + SIZE, 2)])
    assert rt.device == 1
    # Each allocation exported once, on its own GPU; offsets within the allocation.
    assert [c[:3] for c in rt.calls] == [("get", 0, BASE), ("get", 2, BASE + SIZE)]
    assert [e[1] for e in exported if e is not None] == [0x100, 0x200, 0]
    assert exported[0] is not None and exported[0][0] == exported[1][0] != exported[2][0]
    base, size = cuda.open_handle(exported[0][0], 3)
    assert (base, size) == (BASE, SIZE) and rt.calls[-1][:2] == ("open", 3) and rt.device == 1
    cuda.close_handle(base, 3)
    assert rt.calls[-1][:2] == ("close", 3) and rt.device == 1 and rt.opened == []


def test_a_failed_call_clears_its_error_and_the_device_is_still_restored(runtime) -> None:
    rt, _ = runtime
    rt.fail["open"] = 1
    with pytest.raises(TransportError, match="cudaIpcOpenMemHandle failed: invalid argument"):
        cuda.open_handle(bytes(64), 2)
    assert rt.last_error == 0 and rt.device == 0  # torch's next launch check finds nothing
    rt.fail = {"get": 1}  # memory without a handle (expandable segments): None, no error left behind
    assert cuda.export([(BASE, 1)]) == [None]
    assert rt.last_error == 0 and rt.device == 0


def test_a_mapping_whose_size_cannot_be_read_is_closed(runtime) -> None:
    rt, drv = runtime
    drv.fail = True
    with pytest.raises(TransportError, match="cuMemGetAddressRange"):
        cuda.open_handle(bytes(64), 0)
    assert rt.opened == [] and [c[0] for c in rt.calls] == ["open", "close"]
    assert cuda.export([(BASE, 0)]) == [None]  # no allocation found: no handle, nothing raised


def test_a_publisher_whose_memory_has_no_handle_says_so_once(runtime, caplog: pytest.LogCaptureFixture) -> None:
    from refit.transport.cuda_ipc import Exports
    from refit.types import Region

    rt, _ = runtime
    rt.fail = {"get": 1}  # memory from torch's expandable segments: no legacy IPC handle
    exports = Exports()
    regions = [Region(index=0, addr=BASE, nbytes=64, device="cuda"), Region(index=1, addr=BASE + SIZE, nbytes=64)]
    with caplog.at_level("WARNING"):
        for _ in range(3):  # every publish asks again; the reason is said once
            out = exports.regions(regions)
            assert out == regions and not out[0].ipc_handle
    said = [r.getMessage() for r in caplog.records if "no CUDA IPC handle" in r.getMessage()]
    assert len(said) == 1 and "1 of 1 GPU region(s)" in said[0] and "expandable_segments" in said[0]
    rt.fail = {}
    assert exports.regions(regions)[0].ipc_handle  # a later allocation with a handle is published with it
