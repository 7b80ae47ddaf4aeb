"""llama.cpp's RPC backend: model layers on ``rpc-server`` workers on other machines.

Each ``host:port`` is registered with ggml as one more device (``RPC0``, ``RPC1``, ...) before
the first model loads; llama.cpp then splits the offloaded layers (``n_gpu_layers``) over the
local GPUs and those devices in proportion to their free memory, and ships weights and compute
graphs to the workers over TCP. llama-cpp-python 0.3.36 has no Python parameter for this: the
registration goes through ggml's C API (``ggml_backend_rpc_add_server``, looked up through the
RPC backend's ``get_proc_address`` the way llama.cpp's own ``--rpc`` flag does it), and needs a
llama-cpp-python built with ``CMAKE_ARGS="-DGGML_RPC=ON"``.

The RPC protocol has no authentication and no encryption: workers belong on a trusted LAN.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

__all__ = ["NO_RPC_SUPPORT", "RpcError", "parse_endpoints", "register_rpc_servers"]

_log = logging.getLogger(__name__)

NO_RPC_SUPPORT = (
    "this llama-cpp-python build has no RPC support: reinstall with "
    'CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-cache-dir --no-binary '
    "llama-cpp-python llama-cpp-python (or leave rpc_servers empty)"
)
_CONNECT_TIMEOUT_S = 5.0

_lock = threading.Lock()
_registered: dict[str, list[str]] = {}  # endpoint -> its device names (ggml keeps them forever)


class RpcError(RuntimeError):
    """RPC servers were configured but cannot be used."""


def parse_endpoints(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"host:port,host:port"`` (or a list) -> validated, de-duplicated endpoints."""
    items = value.split(",") if isinstance(value, str) else list(value)
    endpoints: list[str] = []
    for raw in items:
        endpoint = raw.strip()
        if not endpoint:
            continue
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"RPC server '{endpoint}' is not host:port (e.g. 192.168.1.20:50052)")
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    return endpoints


def register_rpc_servers(endpoints: list[str]) -> list[str]:
    """Register ``rpc-server`` endpoints as ggml devices; returns their device names.

    Call before the first model loads (models loaded earlier do not use them). Idempotent per
    endpoint. Raises ``RpcError`` when the llama.cpp build lacks the RPC backend or an
    endpoint does not accept connections (ggml would abort the process on it).
    """
    endpoints = parse_endpoints(endpoints)
    if not endpoints:
        return []
    with _lock:
        ggml = _GgmlApi.load()
        devices: list[str] = []
        for endpoint in endpoints:
            if endpoint not in _registered:
                _check_reachable(endpoint)
                _registered[endpoint] = ggml.add_server(endpoint)
            devices.extend(_registered[endpoint])
        return devices


def _check_reachable(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RpcError(
            f"cannot reach the RPC server {endpoint} ({exc.strerror or exc}): start "
            f"'rpc-server -H <its LAN address> -p {port}' on that machine"
        ) from exc


class _GgmlApi:
    """The few ggml backend-registry functions the registration needs, via ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        self.reg_by_name = _fn(lib, "ggml_backend_reg_by_name", vp, [cp])
        self.reg_count = _fn(lib, "ggml_backend_reg_count", ctypes.c_size_t, [])
        self.get_proc_address = _fn(lib, "ggml_backend_reg_get_proc_address", vp, [vp, cp])
        self.register = _fn(lib, "ggml_backend_register", None, [vp])
        self.dev_count = _fn(lib, "ggml_backend_reg_dev_count", ctypes.c_size_t, [vp])
        self.dev_get = _fn(lib, "ggml_backend_reg_dev_get", vp, [vp, ctypes.c_size_t])
        self.dev_name = _fn(lib, "ggml_backend_dev_name", cp, [vp])
        self.dev_memory = _fn(
            lib,
            "ggml_backend_dev_memory",
            None,
            [vp, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
        )
        self.lib = lib

    @classmethod
    def load(cls) -> _GgmlApi:
        import llama_cpp

        if not llama_cpp.llama_supports_rpc():
            raise RpcError(NO_RPC_SUPPORT)
        # libllama's handle resolves ggml's symbols through its dependencies; the package's
        # lib directory (or LLAMA_CPP_LIB_PATH) is the fallback.
        candidates: list[ctypes.CDLL] = []
        handle = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
        if isinstance(handle, ctypes.CDLL):
            candidates.append(handle)
        base = os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")
        for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
            path = Path(base) / name
            if path.exists():
                candidates.append(ctypes.CDLL(str(path)))
        for lib in candidates:
            try:
                return cls(lib)
            except AttributeError:
                continue
        raise RpcError(NO_RPC_SUPPORT)

    def add_server(self, endpoint: str) -> list[str]:
        if not self.reg_count():
            load_all = getattr(self.lib, "ggml_backend_load_all", None)
            if load_all is not None:
                load_all()
        rpc = self.reg_by_name(b"RPC")
        address = self.get_proc_address(rpc, b"ggml_backend_rpc_add_server") if rpc else None
        if not address:
            raise RpcError(NO_RPC_SUPPORT)
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
        reg = add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"the RPC server {endpoint} reports no devices")
        self.register(reg)
        names = []
        for i in range(int(self.dev_count(reg))):
            device = self.dev_get(reg, i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            self.dev_memory(device, ctypes.byref(free), ctypes.byref(total))
            name = (self.dev_name(device) or b"RPC").decode()
            names.append(name)
            _log.info(
                "RPC device %s at %s: %d MiB free of %d MiB",
                name,
                endpoint,
                free.value >> 20,
                total.value >> 20,
            )
        return names


def _fn(lib: ctypes.CDLL, name: str, restype: object, argtypes: list[object]) -> Any:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = argtypes
    return function
