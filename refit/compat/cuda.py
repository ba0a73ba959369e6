"""The CUDA calls refit makes that torch does not expose: IPC handles and raw copies, through ctypes.

- The runtime (`libcudart`): the one torch loaded, found in the process's memory map, so handles and
  copies share torch's contexts and streams. `cudaIpcGetMemHandle`, `cudaIpcOpenMemHandle` (with
  `cudaIpcMemLazyEnablePeerAccess`, so a handle of another GPU on the host maps too),
  `cudaIpcCloseMemHandle`, `cudaMemcpyAsync` and `cudaMemcpy2DAsync` (strided reads) with
  `cudaMemcpyDefault` (unified addressing).
- The driver (`libcuda.so.1`): `cuMemGetAddressRange_v2`, the allocation that holds an address (torch's
  caching allocator hands out pieces of larger allocations; a handle names the whole allocation), and
  `cuPointerGetAttribute` (which GPU a mapping is of).

Memory from `cudaMallocAsync` or torch's expandable segments has no such handle: `export` returns
None and the caller keeps to NIXL. Every failure is a `TransportError` naming the call, with the
runtime's last error cleared (torch's next launch check would raise it as its own). Calls for a GPU
make it current and the caller's device current again after (`on_device`): torch reads the same one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from refit.errors import TransportError
from refit.types import IPC_HANDLE_BYTES

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the pointers (unified addressing)
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_DEVICE_ORDINAL = 9  # CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
_RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


class _Array:
    """A GPU range in the CUDA array interface (version 2: no stream to synchronize with)."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 2,
        }  # fmt: skip


@functools.cache
def _runtime() -> ctypes.CDLL:
    import torch

    try:
        torch.cuda.init()  # loads torch's runtime, so the map below names it
    except (AssertionError, RuntimeError) as exc:  # what torch raises without CUDA
        raise TransportError(f"CUDA IPC: torch has no CUDA here ({exc})") from exc
    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "/libcudart.so" in line]
    for candidate in [*dict.fromkeys(p for p in paths if "/" in p), *_RUNTIME_NAMES]:
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        _declare(lib)
        return lib
    raise TransportError("CUDA IPC: no CUDA runtime library (libcudart) could be loaded")


def _declare(lib: ctypes.CDLL) -> None:
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), vp]
    lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(vp), _Handle, ctypes.c_uint]
    lib.cudaIpcCloseMemHandle.argtypes = [vp]
    lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
    lib.cudaMemcpy2DAsync.argtypes = [vp, sz, vp, sz, sz, sz, ctypes.c_int, vp]
    lib.cudaSetDevice.argtypes = [ctypes.c_int]
    lib.cudaGetDevice.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise TransportError(f"CUDA IPC: the CUDA driver (libcuda.so.1) could not be loaded: {exc}") from exc
    u64 = ctypes.c_uint64
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(u64), ctypes.POINTER(ctypes.c_size_t), u64]
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, u64]
    return lib


def _check(code: int, call: str) -> None:
    if code:
        _clear_error()
        message = _runtime().cudaGetErrorString(code) or b"?"
        raise TransportError(f"CUDA IPC: {call} failed: {message.decode(errors='replace')} ({code})")


def _clear_error() -> None:
    # A failed runtime call leaves its error as the thread's last error, which torch's next launch
    # check (cudaGetLastError) would raise as its own: a failure refit handles must not surface there.
    _runtime().cudaGetLastError()


@contextlib.contextmanager
def on_device(device: int) -> Iterator[None]:
    """GPU `device` current for the calls within, and the caller's device current again after (torch
    reads the thread's current device too)."""
    before = ctypes.c_int()
    _check(_runtime().cudaGetDevice(ctypes.byref(before)), "cudaGetDevice")
    if before.value == device:
        yield
        return
    _check(_runtime().cudaSetDevice(device), f"cudaSetDevice({device})")
    try:
        yield
    finally:
        _check(_runtime().cudaSetDevice(before.value), f"cudaSetDevice({before.value})")


def allocation(addr: int) -> tuple[int, int]:
    """The (base, bytes) of the allocation that holds device address `addr` (its context current)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    code = _driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(addr))
    if code:
        raise TransportError(f"CUDA IPC: cuMemGetAddressRange of {addr:#x} failed (CUresult {code})")
    return base.value, size.value


def export(places: Sequence[tuple[int, int]]) -> list[tuple[bytes, int] | None]:
    """For each (device address, GPU): the IPC handle of the allocation holding it and the address's
    offset in it, or None where the memory has no such handle (stream-ordered or virtual-memory
    allocations). Each allocation is exported once per call, and asked again at every call: memory
    freed and allocated anew, even at the same address, has a new handle."""
    handles: dict[tuple[int, int], bytes | None] = {}
    out: list[tuple[bytes, int] | None] = []
    for addr, device in places:
        with on_device(device):
            try:
                base, _ = allocation(addr)
            except TransportError:
                out.append(None)
                continue
            if (base, device) not in handles:
                handle = _Handle()
                code = _runtime().cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(base))
                if code:
                    _clear_error()
                    logger.debug("no CUDA IPC handle for the allocation at %#x (cudaError %d)", base, code)
                handles[base, device] = None if code else bytes(handle)
        exported = handles[base, device]
        out.append(None if exported is None else (exported, addr - base))
    return out


def open_handle(handle: bytes, device: int) -> tuple[int, int]:
    """Map an exported allocation into this process on GPU `device`: its (base address, bytes)."""
    if len(handle) != IPC_HANDLE_BYTES:
        raise TransportError(f"CUDA IPC: a handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
    ptr = ctypes.c_void_p()
    raw = _Handle.from_buffer_copy(handle)
    with on_device(device):
        _check(_runtime().cudaIpcOpenMemHandle(ctypes.byref(ptr), raw, _LAZY_PEER_ACCESS), "cudaIpcOpenMemHandle")
        base = ptr.value or 0
        try:
            return base, allocation(base)[1]
        except TransportError:
            _runtime().cudaIpcCloseMemHandle(ctypes.c_void_p(base))  # nothing may stay mapped unrecorded
            _clear_error()
            raise


def close_handle(base: int, device: int) -> None:
    with on_device(device):
        _check(_runtime().cudaIpcCloseMemHandle(ctypes.c_void_p(base)), "cudaIpcCloseMemHandle")


def device_of(addr: int) -> int:
    """The GPU whose memory device address `addr` is (a mapping of another GPU's memory names that GPU)."""
    ordinal = ctypes.c_int(-1)
    code = _driver().cuPointerGetAttribute(ctypes.byref(ordinal), _DEVICE_ORDINAL, ctypes.c_uint64(addr))
    if code:
        raise TransportError(f"CUDA IPC: cuPointerGetAttribute of {addr:#x} failed (CUresult {code})")
    return ordinal.value


def tensor_at(addr: int, nbytes: int, device: int) -> torch.Tensor:
    """`nbytes` of GPU `device`'s memory at `addr` (mapped here, e.g. by `open_handle`) as a flat uint8
    tensor, for kernels of this process to read; it does not own the memory, which must stay mapped
    while the tensor (or a view of it, or a CUDA graph that reads it) is used."""
    import torch

    with on_device(device):
        t = torch.as_tensor(_Array(addr, nbytes), device=torch.device("cuda", device))
    if t.data_ptr() != addr or t.numel() != nbytes:  # torch copied it (a device it read otherwise): not a view
        raise TransportError(f"CUDA IPC: torch did not take {nbytes} bytes at {addr:#x} on GPU {device} as they are")
    return t


def copy(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Enqueue a copy of `nbytes` from `src` to `dst` (any GPU of this host) on `stream`."""
    _check(_runtime().cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream), "cudaMemcpyAsync")


def copy_strided(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int, stream: int) -> None:
    """Enqueue `rows` copies of `width` bytes, `src_pitch` apart at the source and `dst_pitch` at `dst`."""
    code = _runtime().cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, _MEMCPY_DEFAULT, stream)
    _check(code, "cudaMemcpy2DAsync")
