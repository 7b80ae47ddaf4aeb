"""Growing past one box: llama.cpp's RPC backend (``rpc_servers``).

Always run: endpoint parsing, and the configuration path on the project's own
llama-cpp-python (a build without ``-DGGML_RPC=ON``): ``appliance serve --rpc-servers`` refuses
to start with one line on stderr and a non-zero exit, before opening its port.

``APPLIANCE_TEST_RPC=1`` also runs the full path (about 10 minutes of compiling on 2 cores the
first time; cached under ``<test cache>/rpc`` afterwards, so it is not part of the default run):

* an RPC-enabled llama-cpp-python wheel of the same version in its own venv
  (``CMAKE_ARGS="-DGGML_RPC=ON" pip install --no-binary llama-cpp-python ...``) plus the
  appliance's dependencies; the appliance itself runs from this checkout;
* ``ggml-rpc-server`` (llama.cpp's ``rpc-server``) built with cmake from the same release's
  sdist (``tools/rpc``), started on loopback with ``GGML_RPC_DEBUG=1``;
* the appliance started with ``--rpc-servers 127.0.0.1:PORT`` loads SmolLM2 onto the RPC
  device and answers a chat completion; the worker's log shows the weights arriving
  (``alloc_buffer`` / ``set_tensor``) and the graphs it computed (``graph_compute``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.engine.rpc import NO_RPC_SUPPORT, RpcError, parse_endpoints, register_rpc_servers
from tests.e2e.openwebui_support import free_port, http_json
from tests.support.models import cache_dir, smollm2_path

REPO = Path(__file__).resolve().parents[2]


def _project_supports_rpc() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


# -- endpoint parsing ---------------------------------------------------------------------


def test_parse_endpoints() -> None:
    assert parse_endpoints("") == []
    assert parse_endpoints(" , ") == []
    assert parse_endpoints("10.0.0.2:50052") == ["10.0.0.2:50052"]
    assert parse_endpoints("a:1, b.lan:50052 ,a:1") == ["a:1", "b.lan:50052"]
    assert parse_endpoints(["gpu-box:50052"]) == ["gpu-box:50052"]


@pytest.mark.parametrize("bad", ["host", ":50052", "host:", "host:port", "host:0", "h:70000"])
def test_parse_endpoints_rejects_malformed(bad: str) -> None:
    with pytest.raises(RpcError, match="host:port"):
        parse_endpoints(bad)


def test_no_endpoints_registers_nothing() -> None:
    assert register_rpc_servers([]) == []


# -- the configuration path on this venv's llama.cpp build --------------------------------


def test_register_explains_what_is_missing() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(RpcError) as caught:
        register_rpc_servers([f"127.0.0.1:{port}"])
    message = str(caught.value)
    if _project_supports_rpc():
        assert f"cannot reach the RPC server 127.0.0.1:{port}" in message
    else:
        assert message == NO_RPC_SUPPORT
        assert message.startswith("this llama-cpp-python build has no RPC support")
        assert "-DGGML_RPC=ON" in message


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    clean.update(env or {})
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--models-dir", str(tmp_path / "models"),
         "--threads", "1", *args],
        capture_output=True, text=True, env=clean, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_serve_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    code, stdout, stderr = _serve(tmp_path, "--rpc-servers", f"127.0.0.1:{port}")
    assert code == 1, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    if _project_supports_rpc():
        expected = f"appliance: error: cannot reach the RPC server 127.0.0.1:{port}"
        assert lines[0].startswith(expected)
    else:
        assert lines[0] == f"appliance: error: {NO_RPC_SUPPORT}"
    assert "Uvicorn running" not in stdout + stderr  # the port never opened


def test_serve_reads_rpc_servers_from_the_environment(tmp_path: Path) -> None:
    code, _, stderr = _serve(tmp_path, env={"APPLIANCE_RPC_SERVERS": "not-an-endpoint"})
    assert code == 1
    assert stderr.strip().splitlines() == [
        "appliance: error: RPC server 'not-an-endpoint' is not host:port (e.g. 192.168.1.20:50052)"
    ]


def test_serve_help_documents_the_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "--rpc-servers" in done.stdout
    assert "APPLIANCE_RPC_SERVERS" in done.stdout


# -- the full path: a real rpc-server worker ----------------------------------------------

RPC_ENABLED = os.environ.get("APPLIANCE_TEST_RPC") == "1"
_BUILD_TIMEOUT_S = 3600


def _llama_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def _run(command: list[str], log: Path, **kwargs: object) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        done = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, timeout=_BUILD_TIMEOUT_S,
            check=False, **kwargs,  # type: ignore[arg-type]
        )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise AssertionError(f"{command[0]} failed ({done.returncode}):\n{tail}")


def _rpc_venv(root: Path, version: str) -> Path:
    """A venv with an RPC-enabled llama-cpp-python and the appliance's other dependencies."""
    venv = root / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".ready"
    if stamp.is_file() and stamp.read_text().strip() == version:
        return python
    log = root / "venv-build.log"
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], log)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_RPC=ON", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install"]
    _run([*pip, "--no-cache-dir", "--no-binary", "llama-cpp-python",
          f"llama-cpp-python=={version}"], log, env=env)  # fmt: skip
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.startswith("llama-cpp-python")]
    _run([*pip, *deps], log)
    stamp.write_text(version + "\n")
    return python


def _rpc_server(root: Path, version: str) -> Path:
    """``ggml-rpc-server`` built from the llama-cpp-python sdist's vendored llama.cpp."""
    binary = root / "build" / "bin" / "ggml-rpc-server"
    stamp = root / "build" / ".ready"
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == version:
        return binary
    log = root / "rpc-server-build.log"
    sdists = root / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    tarball = sdists / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", str(sdists), f"llama-cpp-python=={version}"], log)  # fmt: skip
    with tarfile.open(tarball) as archive:
        archive.extractall(sdists, filter="data")
    source = sdists / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    build = root / "build"
    _run(["cmake", "-S", str(source), "-B", str(build), "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DCMAKE_BUILD_TYPE=Release"], log)  # fmt: skip
    _run(["cmake", "--build", str(build), "--target", "ggml-rpc-server", "-j2"], log)
    stamp.write_text(version + "\n")
    return binary


def _wait_health(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            status, _ = http_json("GET", base_url + "/health", timeout=3)
        except OSError:
            status = 0
        if status == 200:
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the appliance did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def rpc_tools() -> Iterator[tuple[Path, Path]]:
    if not RPC_ENABLED:
        pytest.skip("full RPC path: set APPLIANCE_TEST_RPC=1 (builds llama.cpp with RPC, ~10 min)")
    root = cache_dir() / "rpc"
    root.mkdir(parents=True, exist_ok=True)
    version = _llama_version()
    yield _rpc_venv(root, version), _rpc_server(root, version)


@pytest.mark.timeout(_BUILD_TIMEOUT_S)
def test_model_loads_and_generates_through_an_rpc_worker(
    rpc_tools: tuple[Path, Path], tmp_path: Path
) -> None:
    python, rpc_server = rpc_tools
    rpc_port = free_port()
    rpc_log = tmp_path / "rpc-server.log"
    with rpc_log.open("wb") as out:
        # Line-buffered stdout (its banner is printf'd); the debug log goes to stderr.
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        worker = subprocess.Popen(
            [*line_buffered, str(rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GGML_RPC_DEBUG": "1"},
        )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    data, models = tmp_path / "data", tmp_path / "models"
    models.mkdir()
    (models / "smollm2.gguf").symlink_to(smollm2_path())
    app_log = tmp_path / "appliance.log"
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker listens
            assert worker.poll() is None, rpc_log.read_text()
            assert time.monotonic() < deadline, rpc_log.read_text()
            try:
                socket.create_connection(("127.0.0.1", rpc_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        created = subprocess.run(
            [str(python), "-m", "appliance", "keys", "create", "rpc", "--data-dir", str(data)],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        key = created.stdout.strip().splitlines()[-1]
        port = free_port()
        with app_log.open("wb") as out:
            appliance = subprocess.Popen(
                [str(python), "-m", "appliance", "serve", "--port", str(port),
                 "--data-dir", str(data), "--models-dir", str(models), "--threads", "1",
                 "--ctx-size", "1024", "--parallel", "2",
                 "--rpc-servers", f"127.0.0.1:{rpc_port}"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_health(base_url, appliance, app_log)
            status, body = http_json(
                "POST",
                base_url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Say hello in French."}],
                 "max_tokens": 12, "temperature": 0},
                headers={"Authorization": f"Bearer {key}"},
            )  # fmt: skip
        finally:
            _stop(appliance)
        assert status == 200, body
        answer = body["choices"][0]["message"]["content"]
        assert answer.strip() and body["usage"]["completion_tokens"] > 0
    finally:
        _stop(worker)

    appliance_text = app_log.read_text(errors="replace")
    worker_text = rpc_log.read_text(errors="replace")
    registered = re.search(r"RPC device (\S+) at 127\.0\.0\.1:\d+: .*", appliance_text)
    assert registered, appliance_text
    allocated = sum(int(m) for m in re.findall(r"\[alloc_buffer\] device: \d+, size: (\d+)",
                                               worker_text))  # fmt: skip
    weights = smollm2_path().stat().st_size
    counts = {op: len(re.findall(rf"^\[{op}\]", worker_text, re.M))
              for op in ("hello", "alloc_buffer", "set_tensor", "graph_compute")}  # fmt: skip
    print("\n=== RPC proof ===")
    print(f"appliance: {registered.group(0)}")
    print(f"answer through the worker: {answer!r}  usage: {json.dumps(body['usage'])}")
    print(f"rpc-server: {counts}; {allocated / 2**20:.1f} MiB allocated on the worker "
          f"(model file {weights / 2**20:.1f} MiB)")  # fmt: skip
    print("\n".join(worker_text.splitlines()[:8]))
    print("\n".join(line for line in worker_text.splitlines()
                    if line.startswith(("[alloc_buffer]", "[graph_compute]")))[:1500])  # fmt: skip
    assert counts["set_tensor"] > 100, counts  # the weights were shipped to the worker
    assert counts["graph_compute"] >= 1, counts  # and the worker ran the forward passes
    assert allocated > 0.8 * weights, (allocated, weights)
