#!/usr/bin/env python3
"""Serving benchmark: the appliance against llama.cpp's own ``llama-server``.

Both servers load the same GGUF with the same threads, per-sequence context and parallel
slots, and are driven by the same OpenAI streaming chat requests. They run ONE AT A TIME
(start, measure, stop), never side by side, so that on a small CPU box neither steals cores
from the other. See bench/README.md for what each figure means.

    .venv/bin/python bench/serving_bench.py --quick
    .venv/bin/python bench/serving_bench.py --model /path/to/model.gguf --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SERVERS = ("llama-server", "appliance")

TOPICS = (
    "a lighthouse keeper who finds a map inside a bottle",
    "a city where it rains upwards every Tuesday",
    "two robots learning to bake bread in an old bakery",
    "a dragon who runs a small library in the mountains",
    "the first expedition to the bottom of the ocean",
    "a train that travels between the seasons",
    "a detective solving a mystery on a frozen lake",
    "a gardener who grows clocks instead of flowers",
)

FOLLOW_UP = "Thanks. Now summarise the records above in two sentences."


# -- helpers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> tuple[str, float]:
    """(comm, utime+stime seconds) from a /proc stat file."""
    with open(path) as f:
        raw = f.read()
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in proc_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            total += _stat_cpu(f"/proc/{p}/stat")[1]
    return total


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, cpu seconds) for every thread of pid."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            out[int(tid)] = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return out


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = status_mem_total() / 1024 / 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def status_mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- servers ----------------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """Polls the summed VmRSS of a process tree; VmHWM of the main process is read too."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = sum(status_kb(p, "VmRSS") for p in proc_tree(self.pid))
        self.peak_kb = max(self.peak_kb, rss)
        return rss

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    sampler: RssSampler | None = None
    load_s: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it until stop()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        deadline = t0 + ready_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} while starting; "
                        f"see {self.log_path}"
                    )
                try:
                    if client.get(self.base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {ready_timeout:.0f} s")
                time.sleep(0.25)
        self.load_s = time.monotonic() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        assert self.sampler is not None
        return self.sampler.sample() / 1024

    def peak_mb(self) -> float:
        """Largest of the sampled tree RSS and the kernel's high-water mark (VmHWM)."""
        assert self.sampler is not None
        self.sampler.sample()
        hwm = status_kb(self.pid, "VmHWM")
        return max(self.sampler.peak_kb, hwm) / 1024

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # Signal only the process group this script created for the server.
        for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def llama_server_binary(explicit: str | None) -> str:
    if explicit:
        return explicit
    for build in ("llama-server-build", "llama-server-build-cuda"):
        built = HERE / ".cache" / build / "bin" / "llama-server"
        if built.exists():
            return str(built)
    found = shutil.which("llama-server")
    if found:
        return found
    raise SystemExit(
        "llama-server not found: run bench/build_llama_server.sh or pass --llama-server PATH"
    )


def make_llama_server(args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    argv = [
        llama_server_binary(args.llama_server),
        "-m", str(args.model),
        "-t", str(args.threads),
        "-c", str(args.ctx * args.parallel),
        "-np", str(args.parallel),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--no-webui",
    ]  # fmt: skip
    argv += args.llama_server_arg or []
    return Server(
        "llama-server",
        argv,
        port,
        workdir / "llama-server.log",
        model_id=Path(args.model).stem,
    )


def make_appliance(args: argparse.Namespace, workdir: Path) -> Server:
    port = free_port()
    models = workdir / "models"
    data = workdir / "data"
    models.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    link = models / Path(args.model).name
    if not link.exists():
        link.symlink_to(Path(args.model).resolve())
    model_id = link.stem.lower()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    created = subprocess.run(
        [args.python, "-m", "appliance", "keys", "create", "bench", "--unlimited",
         "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    if created.returncode != 0 or not created.stdout.strip():
        raise RuntimeError(f"appliance keys create failed: {created.stderr.strip()}")
    key = created.stdout.strip().splitlines()[-1].strip()
    argv = [
        args.python, "-m", "appliance", "serve",
        "--models-dir", str(models),
        "--default-model", model_id,
        "--threads", str(args.threads),
        "--ctx-size", str(args.ctx),
        "--parallel", str(args.parallel),
        "--data-dir", str(data),
        "--port", str(port),
    ]  # fmt: skip
    argv += args.appliance_arg or []
    return Server(
        "appliance",
        argv,
        port,
        workdir / "appliance.log",
        headers={"Authorization": f"Bearer {key}"},
        model_id=model_id,
        env=env,
    )


# -- the client -------------------------------------------------------------------------------
@dataclass
class StreamResult:
    sent: float
    first: float = float("nan")  # first non-empty content chunk
    last: float = float("nan")
    end: float = float("nan")
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)  # llama-server's own

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or len(self.chunk_times))

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        if cached is None:
            cached = self.timings.get("cache_n", 0)
        return int(cached or 0)

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time from the first to the last content chunk."""
        span = self.last - self.first
        n = self.completion_tokens - 1
        return n / span if span > 0 and n > 0 else float("nan")

    def gaps(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


class Client:
    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.http = httpx.AsyncClient(
            base_url=server.base,
            headers=server.headers,
            timeout=httpx.Timeout(args.request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> StreamResult:
        body: dict[str, Any] = {
            "model": self.server.model_id,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.args.ignore_eos:
            body["ignore_eos"] = True  # both servers honour it
        return await asyncio.wait_for(self._chat(body), timeout=self.args.request_timeout)

    async def _chat(self, body: dict[str, Any]) -> StreamResult:
        result = StreamResult(sent=time.perf_counter())
        parts: list[str] = []
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"{self.server.name}: HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"{self.server.name}: stream error {obj['error']}")
                if obj.get("usage"):
                    result.usage = obj["usage"]
                if obj.get("timings"):
                    result.timings = obj["timings"]
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {}
                    piece = delta.get("content") or delta.get("reasoning_content")
                    if piece:
                        if not result.chunk_times:
                            result.first = now
                        result.chunk_times.append(now)
                        parts.append(piece)
        result.end = time.perf_counter()
        if result.chunk_times:
            result.last = result.chunk_times[-1]
        result.text = "".join(parts)
        return result


def story_messages(i: int) -> list[dict[str, str]]:
    """A prompt both test models answer at length (over 256 tokens, so every stream runs to
    max_tokens without ignore_eos); the leading number makes every request's prompt new, so
    no server can answer it from its prefix cache (every TTFT here is a cold one)."""
    topic = TOPICS[i % len(TOPICS)]
    return [
        {
            "role": "user",
            "content": f"Request {i}. Explain in great detail, step by step, how to build a "
            f"program that simulates {topic}. Write the full Python code with comments and "
            "then explain every function at length.",
        }
    ]


def history_message(rep: int, sentences: int) -> str:
    """A deterministic ~2000-token document; rep changes its first line (no cached prefix)."""
    rng = random.Random(1000 + rep)
    adjectives = ("small", "northern", "busy", "quiet", "old", "new", "coastal", "central")
    places = ("Oslo", "Lyon", "Porto", "Graz", "Turin", "Ghent", "Cork", "Brno", "Split")
    items = ("apples", "bolts", "cables", "lamps", "tiles", "valves", "books", "chairs")
    lines = [f"Session {rep}-{rng.getrandbits(32):08x}. Here is a warehouse log:"]
    for n in range(1, sentences + 1):
        lines.append(
            f"Record {n}: the {rng.choice(adjectives)} depot in {rng.choice(places)} shipped "
            f"{rng.randint(10, 999)} {rng.choice(items)} on day {rng.randint(1, 365)} "
            f"and received {rng.randint(10, 999)} {rng.choice(items)}."
        )
    lines.append("Which depot shipped the most items? Explain your reasoning step by step.")
    return "\n".join(lines)


# -- the measurements -------------------------------------------------------------------------
def _busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (all of /proc/stat's non-idle columns)."""
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = cols
    return (user + nice + system + irq + softirq + steal) / _TICK


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Probe:
    """Wall time, server CPU and foreign CPU (everyone but the server and this client)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.perf_counter()
        self.busy0 = _busy_seconds()
        self.server0 = cpu_seconds(pid)
        self.self0 = _self_cpu()

    def done(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        server = cpu_seconds(self.pid) - self.server0
        me = _self_cpu() - self.self0
        other = _busy_seconds() - self.busy0 - server - me
        return {
            "wall_s": wall,
            "server_cpu_s": server,
            "client_cpu_s": me,
            "foreign_cores": max(0.0, other / wall) if wall > 0 else 0.0,
        }


class Retry:
    """Repeats a measurement that other processes disturbed (foreign CPU load above the limit),
    at most ``retries`` extra times per stage."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.limit = args.max_foreign
        self.left = args.retries

    def again(self, foreign: float) -> bool:
        if foreign <= self.limit or self.left <= 0:
            return False
        self.left -= 1
        return True


class Samples:
    """metric key -> list of samples, each with the foreign CPU load seen while measured."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.foreign: dict[str, list[float]] = {}

    def add(self, key: str, value: float, foreign: float) -> None:
        self.values.setdefault(key, []).append(value)
        self.foreign.setdefault(key, []).append(round(foreign, 3))


async def run_server_suite(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    client = Client(server, args)
    samples = Samples()
    counter = iter(range(1_000_000))  # a fresh prompt for every request
    details: dict[str, Any] = {}
    out: dict[str, Any] = {"rss_after_load_mb": round(server.rss_mb(), 1)}
    cpu0 = cpu_seconds(server.pid)
    pid = server.pid

    def log(msg: str) -> None:
        print(f"  [{server.name}] {msg}", flush=True)

    try:
        # Warm-up (llama-server warms up at load; the appliance may not): not measured.
        await client.chat([{"role": "user", "content": "Say hello."}], 8)
        out["rss_after_warmup_mb"] = round(server.rss_mb(), 1)

        # 1. single stream: TTFT and decode speed
        details["single"] = []
        rep, retry = 0, Retry(args)
        while rep < args.single_reps:
            probe = Probe(pid)
            r = await client.chat(story_messages(next(counter)), args.max_tokens)
            noise = probe.done()
            samples.add("single.ttft_ms", r.ttft * 1000, noise["foreign_cores"])
            samples.add("single.decode_tps", r.decode_tps, noise["foreign_cores"])
            samples.add("single.tokens", r.completion_tokens, noise["foreign_cores"])
            details["single"].append(
                {
                    "ttft_ms": round(r.ttft * 1000, 1),
                    "decode_tps": round(r.decode_tps, 2),
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "chunks": len(r.chunk_times),
                    **{k: round(v, 3) for k, v in noise.items()},
                }
            )
            log(
                f"single #{rep + 1}: ttft {r.ttft * 1000:.0f} ms, decode {r.decode_tps:.1f} "
                f"tok/s, {r.completion_tokens} tokens, prompt {r.prompt_tokens}, "
                f"foreign load {noise['foreign_cores']:.2f} cores"
            )
            if retry.again(noise["foreign_cores"]):
                log("  disturbed by other processes: measuring again")
                continue
            rep += 1

        # 2. concurrency sweep: aggregate throughput and inter-token latency
        details["concurrency"] = {}
        for c in args.concurrency:
            rounds: list[dict[str, Any]] = []
            rnd, retry = 0, Retry(args)
            while rnd < args.conc_rounds:
                threads_before = thread_cpu(pid)
                probe = Probe(pid)
                results = await asyncio.gather(
                    *(client.chat(story_messages(next(counter)), args.max_tokens) for _ in range(c))
                )
                noise = probe.done()
                threads_after = thread_cpu(pid)
                wall = noise["wall_s"]
                tokens = sum(r.completion_tokens for r in results)
                gaps = [g for r in results for g in r.gaps()]
                # decode-phase throughput: tokens after each stream's first, over the span from
                # the earliest first token to the latest last token
                span = max(r.last for r in results) - min(r.first for r in results)
                row: dict[str, Any] = {
                    "tokens": tokens,
                    "agg_tps": tokens / wall,
                    "decode_agg_tps": (tokens - c) / span if span > 0 else float("nan"),
                    "itl_p50_ms": percentile(gaps, 50) * 1000,
                    "itl_p99_ms": percentile(gaps, 99) * 1000,
                    "ttft_p50_ms": percentile([r.ttft for r in results], 50) * 1000,
                    "ttft_max_ms": max(r.ttft for r in results) * 1000,
                    "cpu_ms_per_token": noise["server_cpu_s"] / tokens * 1000
                    if tokens
                    else float("nan"),
                    **noise,
                    "threads_cpu_s": _thread_deltas(pid, threads_before, threads_after),
                }
                for key in ("agg_tps", "decode_agg_tps", "itl_p50_ms", "itl_p99_ms",
                            "ttft_p50_ms", "cpu_ms_per_token", "tokens"):  # fmt: skip
                    samples.add(f"c{c}.{key}", row[key], noise["foreign_cores"])
                rounds.append(
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                )
                log(
                    f"c={c} round {rnd + 1}: {row['agg_tps']:.1f} tok/s aggregate, itl p50 "
                    f"{row['itl_p50_ms']:.1f} ms p99 {row['itl_p99_ms']:.1f} ms, {tokens} "
                    f"tokens in {wall:.1f} s, foreign load {noise['foreign_cores']:.2f} cores"
                )
                if retry.again(noise["foreign_cores"]):
                    log("  disturbed by other processes: measuring again")
                    continue
                rnd += 1
            details["concurrency"][str(c)] = rounds

        # 3. multi-turn: cold TTFT on a ~2k-token message, then the follow-up turn's TTFT
        details["multi_turn"] = []
        rep, retry = 0, Retry(args)
        while rep < args.turn_reps:
            user = history_message(next(counter), args.history_sentences)
            probe = Probe(pid)
            first = await client.chat([{"role": "user", "content": user}], args.max_tokens)
            noise1 = probe.done()
            messages = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": FOLLOW_UP},
            ]
            probe = Probe(pid)
            second = await client.chat(messages, args.turn2_tokens)
            noise2 = probe.done()
            samples.add("turn1.ttft_ms", first.ttft * 1000, noise1["foreign_cores"])
            samples.add("turn2.ttft_ms", second.ttft * 1000, noise2["foreign_cores"])
            details["multi_turn"].append(
                {
                    "turn1_ttft_ms": round(first.ttft * 1000, 1),
                    "turn1_prompt_tokens": first.prompt_tokens,
                    "turn1_completion_tokens": first.completion_tokens,
                    "turn2_ttft_ms": round(second.ttft * 1000, 1),
                    "turn2_prompt_tokens": second.prompt_tokens,
                    "turn2_cached_tokens": second.cached_tokens,
                    "foreign_cores": [
                        round(noise1["foreign_cores"], 3),
                        round(noise2["foreign_cores"], 3),
                    ],
                }
            )
            log(
                f"multi-turn #{rep + 1}: turn 1 ttft {first.ttft * 1000:.0f} ms "
                f"({first.prompt_tokens} prompt tokens), turn 2 ttft "
                f"{second.ttft * 1000:.0f} ms ({second.prompt_tokens} prompt, "
                f"{second.cached_tokens} cached), foreign load "
                f"{noise1['foreign_cores']:.2f}/{noise2['foreign_cores']:.2f} cores"
            )
            if retry.again(max(noise1["foreign_cores"], noise2["foreign_cores"])):
                log("  disturbed by other processes: measuring again")
                continue
            rep += 1
    finally:
        await client.close()
    out["cpu_s_total"] = round(cpu_seconds(pid) - cpu0, 2)
    out["rss_peak_mb"] = round(server.peak_mb(), 1)
    out["load_s"] = round(server.load_s, 2)
    for key in ("load_s", "rss_after_load_mb", "rss_peak_mb"):
        samples.add(key, out[key], 0.0)
    out["samples"] = samples.values
    out["foreign_cores"] = samples.foreign
    out["details"] = details
    return out


def _thread_deltas(
    pid: int,
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
) -> list[dict[str, Any]]:
    """CPU seconds per thread over one round, busiest first (the main thread is flagged)."""
    rows: list[dict[str, Any]] = []
    for tid, (name, cpu) in after.items():
        delta = cpu - before.get(tid, (name, 0.0))[1]
        if delta > 0.005:
            rows.append({"tid": tid, "name": name, "main": tid == pid, "cpu_s": round(delta, 3)})
    rows.sort(key=lambda r: -r["cpu_s"])
    return rows[:8]


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    server = (make_appliance if name == "appliance" else make_llama_server)(args, workdir)
    print(f"starting {name}: {' '.join(server.argv)}", flush=True)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        server.start(args.ready_timeout)
        print(f"  [{name}] ready in {server.load_s:.1f} s (pid {server.pid})", flush=True)
        if args.profile and name == "appliance":
            profiler = start_profiler(args, server.pid)
        result = asyncio.run(run_server_suite(server, args))
        result["argv"] = server.argv
        return result
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        server.stop()
        if args.keep_logs:
            print(f"  [{name}] logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def start_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes]:
    pyspy = args.py_spy or shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("--profile needs py-spy (pip install py-spy) or --py-spy PATH")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile-{Path(args.model).stem}-{args.stamp}.txt"
    argv = [pyspy, "record", "--pid", str(pid), "--rate", "100", "--threads", "--idle",
            "--format", "raw", "--output", str(out)]  # fmt: skip
    if args.profile_native:
        argv.append("--native")
    print(f"  profiling the appliance with py-spy into {out}", flush=True)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# -- report -----------------------------------------------------------------------------------
def metric_rows(concurrency: list[int]) -> list[tuple[str, str, str, str]]:
    """(label, sample key, unit, which direction is better)."""
    rows = [
        ("load time", "load_s", "s", "lower"),
        ("single: TTFT", "single.ttft_ms", "ms", "lower"),
        ("single: decode", "single.decode_tps", "tok/s", "higher"),
        ("single: completion tokens", "single.tokens", "tok", "equal"),
    ]
    for c in concurrency:
        rows += [
            (f"c={c}: aggregate", f"c{c}.agg_tps", "tok/s", "higher"),
            (f"c={c}: decode-phase aggregate", f"c{c}.decode_agg_tps", "tok/s", "higher"),
            (f"c={c}: ITL p50", f"c{c}.itl_p50_ms", "ms", "lower"),
            (f"c={c}: ITL p99", f"c{c}.itl_p99_ms", "ms", "lower"),
            (f"c={c}: TTFT p50", f"c{c}.ttft_p50_ms", "ms", "lower"),
            (f"c={c}: server CPU per token", f"c{c}.cpu_ms_per_token", "ms", "lower"),
            (f"c={c}: completion tokens", f"c{c}.tokens", "tok", "equal"),
        ]
    rows += [
        ("2k history: turn-1 TTFT (cold)", "turn1.ttft_ms", "ms", "lower"),
        ("2k history: turn-2 TTFT", "turn2.ttft_ms", "ms", "lower"),
        ("RSS after load", "rss_after_load_mb", "MB", "lower"),
        ("RSS peak", "rss_peak_mb", "MB", "lower"),
    ]
    return rows


def fmt(v: float) -> str:
    if v != v:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _pool(
    runs: list[dict[str, Any]], key: str, max_foreign: float
) -> tuple[list[float], list[float], int]:
    """One metric's samples over all runs, keeping only the undisturbed ones (foreign CPU load
    at most max_foreign) when there are any. Returns (values, their foreign loads, total)."""
    pairs: list[tuple[float, float]] = []
    for run in runs:
        values = run.get("samples", {}).get(key, [])
        foreign = run.get("foreign_cores", {}).get(key, [0.0] * len(values))
        pairs += [(v, f) for v, f in zip(values, foreign, strict=True) if v == v]
    used = [(v, f) for v, f in pairs if f <= max_foreign] or pairs
    return [v for v, _ in used], [f for _, f in used], len(pairs)


def _ratio(a: float, b: float) -> float:
    return a / b if a == a and b == b and b else float("nan")


def summarise(
    rounds: list[dict[str, dict[str, Any]]], concurrency: list[int], max_foreign: float
) -> list[dict[str, Any]]:
    """Per metric, samples pooled over all rounds (undisturbed ones only, when there are any):
    median and best. Interference only ever slows a server down, so the best sample is the
    least disturbed one."""
    rows = []
    for label, key, unit, better in metric_rows(concurrency):
        row: dict[str, Any] = {"metric": label, "key": key, "unit": unit, "better": better}
        for name, col in (("appliance", "appliance"), ("llama-server", "llama_server")):
            runs = [r[name] for r in rounds if name in r]
            vals, foreign, total = _pool(runs, key, max_foreign)
            pick = min if better == "lower" else max
            row[col] = median(vals)
            row[col + "_best"] = pick(vals) if vals else float("nan")
            row[col + "_n"] = len(vals)
            row[col + "_total"] = total
            row[col + "_foreign"] = median(foreign)
        row["ratio"] = _ratio(row["appliance"], row["llama_server"])
        row["ratio_best"] = _ratio(row["appliance_best"], row["llama_server_best"])
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    by = {r["key"]: r for r in rows}
    top = max(concurrency)
    checks = []

    def add(name: str, med: float, best: float, goal: str, op: str, limit: float) -> None:
        def ok(v: float) -> bool:
            return v == v and (v >= limit if op == ">=" else v <= limit)

        checks.append(
            {
                "target": name,
                "median": med,
                "best": best,
                "goal": goal,
                "ok_median": ok(med),
                "ok_best": ok(best),
            }
        )

    for label, key, op, limit in (
        ("single-stream decode ratio", "single.decode_tps", ">=", 1.0),
        ("single-stream TTFT ratio", "single.ttft_ms", "<=", 1.1),
        (f"aggregate at {top} streams ratio", f"c{top}.agg_tps", ">=", 1.1),
        ("turn-2 TTFT ratio", "turn2.ttft_ms", "<=", 1.0),
    ):
        r = by[key]
        add(label, r["ratio"], r["ratio_best"], f"{op} {limit}", op, limit)
    t1, t2 = by["turn1.ttft_ms"], by["turn2.ttft_ms"]
    add(
        "appliance turn-2 / turn-1 TTFT",
        _ratio(t2["appliance"], t1["appliance"]),
        _ratio(t2["appliance_best"], t1["appliance_best"]),
        "<= 0.1",
        "<=",
        0.1,
    )
    rss = by["rss_peak_mb"]
    add(
        "RSS peak overhead (MB)",
        rss["appliance"] - rss["llama_server"],
        rss["appliance_best"] - rss["llama_server_best"],
        "<= 150",
        "<=",
        150,
    )
    return checks


def print_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    head = (
        f"{'metric':32} {'unit':5} {'appliance':>9} {'llama-srv':>9} {'ratio':>6} | "
        f"{'appl best':>9} {'llama best':>10} {'ratio':>6} | {'n':>5} {'foreign':>9}"
    )
    print()
    print("median of the undisturbed samples | best sample | samples used (appliance/llama) "
          "and their median foreign CPU load in cores")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['metric']:32} {r['unit']:5} {fmt(r['appliance']):>9} "
            f"{fmt(r['llama_server']):>9} {fmt(r['ratio']):>6} | "
            f"{fmt(r['appliance_best']):>9} {fmt(r['llama_server_best']):>10} "
            f"{fmt(r['ratio_best']):>6} | {r['appliance_n']:>2}/{r['llama_server_n']:<2} "
            f"{fmt(r['appliance_foreign']):>4}/{fmt(r['llama_server_foreign']):<4}"
        )
    if not checks:
        return
    print()
    print(f"{'target':34} {'goal':>8} {'median':>8} {'':6} {'best':>8}")
    for c in checks:
        print(
            f"{c['target']:34} {c['goal']:>8} {fmt(c['median']):>8} "
            f"{'ok' if c['ok_median'] else 'MISSED':6} {fmt(c['best']):>8} "
            f"{'ok' if c['ok_best'] else 'MISSED'}"
        )


# -- main -------------------------------------------------------------------------------------
def default_model() -> str:
    sys.path.insert(0, str(ROOT))
    try:
        from tests.support.models import smollm2_path
    finally:
        sys.path.pop(0)
    return str(smollm2_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (both servers)")
    p.add_argument("--ctx", type=int, default=4096, help="context per sequence")
    p.add_argument("--parallel", type=int, default=8, help="slots (>= the largest concurrency)")
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated stream counts")
    p.add_argument(
        "--history-sentences",
        type=int,
        default=64,
        help="records in the long multi-turn message (64 is about 2000 tokens)",
    )
    p.add_argument("--turn2-tokens", type=int, default=32, help="max_tokens of turn 2")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos: every stream runs to max_tokens on both servers (use it with "
        "random-weight models, which stop at different points)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.3,
        help="foreign CPU load (cores busy outside both servers and this client) "
        "above which a sample counts as disturbed: it is measured again and left "
        "out of the summary when undisturbed samples exist",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="extra measurements per stage for disturbed samples (default 4, quick 1)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both servers this many times, alternating the order",
    )
    p.add_argument("--only", choices=SERVERS, help="benchmark one server only")
    p.add_argument("--llama-server", help="llama-server binary (default: bench/.cache build)")
    p.add_argument(
        "--llama-server-arg",
        action="append",
        help="extra llama-server argument (repeatable; use --llama-server-arg=-x)",
    )
    p.add_argument(
        "--appliance-arg", action="append", help="extra 'appliance serve' argument (repeatable)"
    )
    p.add_argument("--python", default=sys.executable, help="python that runs the appliance")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to load a model")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run py-spy (raw collapsed stacks) on the appliance; its numbers are "
        "then perturbed by the sampling",
    )
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--py-spy", help="py-spy binary")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' work dirs")
    p.add_argument("--output", help="JSON path (default bench/results/<model>-<date>.json)")
    args = p.parse_args(argv)
    args.model = str(Path(args.model or default_model()).resolve())
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if max(args.concurrency) > args.parallel:
        p.error("--parallel must be at least the largest --concurrency")
    args.single_reps = 2 if args.quick else 3
    args.conc_rounds = 1 if args.quick else 2
    args.turn_reps = 2 if args.quick else 3
    if args.retries is None:
        args.retries = 1 if args.quick else 4
    args.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return args


def _interrupt(signum: int, frame: object) -> None:
    # Raised wherever the main thread is, so every ``finally`` (server shutdown) runs; a
    # handler of our own also keeps asyncio.run from turning SIGINT into a task cancellation
    # that a library in the middle of a stream may swallow.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    servers = [args.only] if args.only else list(SERVERS)
    settings = {
        "model": args.model,
        "model_bytes": Path(args.model).stat().st_size,
        "threads": args.threads,
        "ctx_per_seq": args.ctx,
        "parallel": args.parallel,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "single_reps": args.single_reps,
        "conc_rounds": args.conc_rounds,
        "turn_reps": args.turn_reps,
        "repeat": args.repeat,
        "quick": args.quick,
        "max_foreign": args.max_foreign,
        "retries": args.retries,
        "profile": args.profile,
    }
    print(f"model {args.model}; threads {args.threads}, ctx {args.ctx}/seq, "
          f"{args.parallel} slots; {args.repeat} round(s)")  # fmt: skip
    rounds: list[dict[str, dict[str, Any]]] = []
    machine = machine_info()
    for i in range(args.repeat):
        order = servers if i % 2 == 0 else list(reversed(servers))
        current: dict[str, dict[str, Any]] = {}
        for name in order:
            current[name] = run_one(name, args)
            current[name]["loadavg_after"] = os.getloadavg()
        rounds.append(current)
    rows = summarise(rounds, args.concurrency, args.max_foreign)
    checks = targets(rows, args.concurrency) if len(servers) == 2 else []
    print_table(rows, checks)
    name = f"{Path(args.model).stem}-{args.stamp}.json"
    out = Path(args.output) if args.output else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    machine["loadavg_at_end"] = os.getloadavg()
    doc = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "summary": rows,
        "targets": checks,
        "rounds": rounds,
    }
    out.write_text(json.dumps(_finite(doc), indent=2, default=_json_default) + "\n")
    print(f"\nwrote {out}")
    return 0


def _finite(v: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _json_default(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v))


if __name__ == "__main__":
    sys.exit(main())
