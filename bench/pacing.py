"""Pacing benchmark (issue #3): batchd against FakeUpstreams with limits, latency and faults.

    python bench/pacing.py [--scenario NAME ...] [--quick] [--json PATH] [--keep] [--py-spy SECONDS]

Each scenario starts ``batchd fake-upstream`` subprocess(es) and a ``batchd serve`` subprocess
on free ports (temporary data dir), uploads a ``/v1/chat/completions`` JSONL with the official
``openai`` SDK, creates a batch, polls it to a terminal status (the time reported is create ->
terminal), downloads the output and error files and checks that every ``custom_id`` came back
exactly once. FakeUpstream counters (``GET /_fake/stats``) are sampled every second, so 429s
after the first minute are the total minus the count sampled at t = 60 s.

Scenarios (full size; ``--quick`` divides lines, outage and first-minute by ~5):

  rpm                FakeUpstream rpm=1200, 6,000 lines, ``--upstream-rpm 1200``.
                     ideal = N / RPM. Target: time <= 1.03 x ideal and 429s <= 1% of the
                     requests sent after the first minute.
  rpm-learned        the same, but batchd is not told the limit (learns it from 429s,
                     retry-after and x-ratelimit-* headers). Same target.
  latency            FakeUpstream latency 0.2 s, max_concurrency 64, 20,000 lines,
                     ``--upstream-concurrency 64``. ideal = N x latency / 64. Target <= 1.10.
  zero-latency       FakeUpstream without limits, 20,000 lines: batchd lines/s against (a) the
                     seeds' client-side pattern (asyncio + AsyncOpenAI + semaphore + retry on
                     429, results to JSONL; ../shared/seeds/flex-ai-batching.md) and (b) a bare
                     aiohttp loop (the ceiling), same concurrency, each in its own process.
                     Target: >= 10x the pattern and >= 60% of the ceiling. Also (c) a bare
                     pyreqwest loop: batchd's own HTTP client with no bookkeeping. Then batchd again on
                     10x the lines (row zero-latency-10x): peak server RSS should stay flat
                     (here: <= 1.25x the 1x run's).
  faults             failure_rate 0.05 (500s), latency 0.2 s, 20,000 lines, and a 60 s outage
                     (503 + retry-after) started when 30% of the lines are answered. ideal is
                     N / (1 - 0.05) x latency / 64, without the outage. Target: zero failed lines.
  two-upstreams      two FakeUpstreams for one model, weights 3:1 in a batchd.toml; each one's
                     share of 200 answers. Target: big/small within 5% of 3.
  two-upstreams-kill the same; the small upstream is SIGKILLed when 40% of lines are answered.
                     Target: completed with zero failed lines.

Every row also requires the batch to complete with every custom_id exactly once. Exit status 0
when every row passes. All subprocesses are stopped on exit (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402  (bench/ is not a package)
    TERMINAL,
    BenchError,
    Proc,
    RssSampler,
    free_port,
    git_revision,
    http_ok,
    wait_until,
    write_input,
)

CONCURRENCY = 64
FIRST_MINUTE = 60.0
POLL = 0.25


# --------------------------------------------------------------------------- scenarios


@dataclass
class Fake:
    """One FakeUpstream: settings posted to /_fake/config, and its batchd.toml entry."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass
class Event:
    """Something done to an upstream once ``at`` of the lines are answered 200."""

    at: float
    action: str  # "outage" or "kill"
    fake: int
    seconds: float = 0.0


@dataclass
class Scenario:
    name: str
    lines: int
    fakes: list[Fake]
    serve_args: list[str] = field(default_factory=list)
    toml: bool = False
    ideal_s: float | None = None
    target: str = ""
    events: list[Event] = field(default_factory=list)
    first_minute: float = FIRST_MINUTE


def scenarios(quick: bool) -> dict[str, list[Scenario]]:
    q = 5 if quick else 1
    minute = FIRST_MINUTE / q
    rpm_n, lat_n, zero_n, fault_n, two_n = 6000 // q, 20000 // q, 20000 // q, 20000 // q, 20000 // q
    rpm_cfg = {"rpm": 1200}
    lat = 0.2
    out: dict[str, list[Scenario]] = {
        "rpm": [
            Scenario("rpm", rpm_n, [Fake("fake", rpm_cfg)], ["--upstream-rpm", "1200"],
                     ideal_s=rpm_n / 1200 * 60, target="<=1.03x, 429s<=1% after 1st min",
                     first_minute=minute)
        ],
        "rpm-learned": [
            Scenario("rpm-learned", rpm_n, [Fake("fake", rpm_cfg)], [],
                     ideal_s=rpm_n / 1200 * 60, target="<=1.03x, 429s<=1% after 1st min",
                     first_minute=minute)
        ],
        "latency": [
            Scenario("latency", lat_n, [Fake("fake", {"latency": lat, "max_concurrency": CONCURRENCY})],
                     ["--upstream-concurrency", str(CONCURRENCY)],
                     ideal_s=lat_n * lat / CONCURRENCY, target="<=1.10x", first_minute=minute)
        ],
        "zero-latency": [
            Scenario("zero-latency", zero_n, [Fake("fake")], ["--upstream-concurrency", str(CONCURRENCY)],
                     target=">=10x pattern, >=60% ceiling", first_minute=minute),
            Scenario("zero-latency-10x", zero_n * 10, [Fake("fake")],
                     ["--upstream-concurrency", str(CONCURRENCY)],
                     target="peak RSS <=1.25x of 1x", first_minute=minute),
        ],
        "faults": [
            Scenario("faults", fault_n, [Fake("fake", {"latency": lat, "failure_rate": 0.05, "seed": 3})],
                     ["--upstream-concurrency", str(CONCURRENCY)],
                     ideal_s=fault_n / 0.95 * lat / CONCURRENCY, target="0 failed lines",
                     events=[Event(0.30, "outage", 0, 60.0 / q)], first_minute=minute)
        ],
        "two-upstreams": [
            Scenario("two-upstreams", two_n,
                     [Fake("big", {"latency": 0.05}, 3), Fake("small", {"latency": 0.05}, 1)],
                     toml=True, target="big/small within 5% of 3", first_minute=minute)
        ],
        "two-upstreams-kill": [
            Scenario("two-upstreams-kill", two_n,
                     [Fake("big", {"latency": 0.05}, 3), Fake("small", {"latency": 0.05}, 1)],
                     toml=True, target="0 failed lines", events=[Event(0.40, "kill", 1)],
                     first_minute=minute)
        ],
    }
    return out


# --------------------------------------------------------------------------- small helpers


def post_json(url: str, payload: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def fetch_stats(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/_fake/stats", timeout=2) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return None


def clean_env() -> dict[str, str]:
    """The environment without BATCHD_* settings, so runs do not inherit a developer's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}


def status_count(stats: dict[str, Any] | None, code: int) -> int:
    return int((stats or {}).get("by_status", {}).get(str(code), 0))


def five_xx(stats: dict[str, Any] | None) -> int:
    return sum(int(n) for k, n in (stats or {}).get("by_status", {}).items() if k.startswith("5"))


class FakeProc:
    """A ``batchd fake-upstream`` subprocess with the last stats it answered."""

    def __init__(self, spec: Fake, work: Path, procs: list[Proc]):
        self.spec = spec
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Proc(
            f"fake-upstream {spec.name}",
            [sys.executable, "-m", "batchd", "fake-upstream", "--port", str(port)],
            clean_env(),
            work / f"fake-{spec.name}.log",
        )
        procs.append(self.proc)
        self.last: dict[str, Any] | None = None
        self.killed_at: float | None = None

        def up() -> bool:
            self.proc.check_alive()
            return http_ok(self.url + "/health")

        wait_until(up, 30, f"fake upstream {spec.name} /health")
        if spec.config:
            post_json(self.url + "/_fake/config", spec.config)
        post_json(self.url + "/_fake/reset", {})

    def sample(self) -> dict[str, Any] | None:
        if self.killed_at is None:
            stats = fetch_stats(self.url)
            if stats is not None:
                self.last = stats
        return self.last

    def kill(self, t: float) -> None:
        self.sample()
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait()
        self.killed_at = t


def start_server(
    sc: Scenario, work: Path, fakes: list[FakeProc], procs: list[Proc], tag: str
) -> tuple[Proc, int]:
    port = free_port()
    argv = [sys.executable, "-m", "batchd", "serve", "--port", str(port),
            "--data-dir", str(work / f"data-{tag}"), "--log-level", "warning"]
    if sc.toml:
        cfg = work / f"batchd-{tag}.toml"
        cfg.write_text("".join(
            f'[[upstreams]]\nname = "{f.spec.name}"\nurl = "{f.url}/v1"\nmodels = ["fake-model"]\n'
            f"weight = {f.spec.weight}\nmax_concurrency = {CONCURRENCY}\n\n"
            for f in fakes
        ))
        argv += ["--config", str(cfg)]
    else:
        argv += ["--upstream", fakes[0].url + "/v1"]
    argv += sc.serve_args
    server = Proc("batchd serve", argv, clean_env(), work / f"server-{tag}.log")
    procs.append(server)

    def healthy() -> bool:
        server.check_alive()
        return http_ok(f"http://127.0.0.1:{port}/health")

    wait_until(healthy, 60, "batchd /health")
    return server, port


def start_profiler(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [exe, "record", "-d", str(seconds), "-o", str(out), "--format", "raw", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=out.with_suffix(".log").open("wb"),
    )


# --------------------------------------------------------------------------- result checks


def check_lines(ids: list[str], out: bytes, err: bytes) -> dict[str, Any]:
    """Count (don't raise): non-200 output lines and error lines are failed lines."""
    seen: collections.Counter[str] = collections.Counter()
    failed = 0
    for data, is_out in ((out, True), (err, False)):
        for line in data.splitlines():
            if not line.strip():
                continue
            obj = orjson.loads(line)
            seen[obj["custom_id"]] += 1
            ok = is_out and obj.get("error") is None and obj["response"]["status_code"] == 200
            failed += not ok
    expected = set(ids)
    missing, extra = expected - seen.keys(), seen.keys() - expected
    dup = sum(1 for n in seen.values() if n > 1)
    return {
        "failed_lines": failed,
        "missing": len(missing),
        "unexpected": len(extra),
        "duplicated": dup,
        "ids_ok": not missing and not extra and not dup,
        "missing_sample": sorted(missing)[:5],
    }


# --------------------------------------------------------------------------- one batchd run


class Run:
    """One batch through one ``batchd serve``: the poll loop, events and the stats timeline."""

    def __init__(
        self, sc: Scenario, fakes: list[FakeProc], server: Proc, port: int, args: argparse.Namespace
    ):
        self.sc, self.fakes, self.server, self.args = sc, fakes, server, args
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=2, timeout=600
        )
        self.timeline: list[dict[str, Any]] = []
        self.at_first_minute: list[dict[str, Any] | None] | None = None
        self.events_done: list[dict[str, Any]] = []
        self.pending = sorted(sc.events, key=lambda e: e.at)
        self.t0 = 0.0

    def limit_s(self) -> float:
        if self.sc.ideal_s is not None:
            base = 3 * self.sc.ideal_s + sum(e.seconds for e in self.sc.events)
        else:
            base = self.sc.lines / 200  # zero-latency: at worst 200 lines/s
        return max(180.0, base + 120.0)

    def sample(self, t: float, record: bool = True) -> None:
        snaps = [f.sample() for f in self.fakes]
        self.fire_events(t, snaps)
        if not record:
            return
        row: dict[str, Any] = {"t": round(t, 2), "server_rss_mb": self.server_rss_mb()}
        for f, s in zip(self.fakes, snaps, strict=True):
            row[f.spec.name] = {
                "requests": (s or {}).get("requests", 0),
                "200": status_count(s, 200),
                "429": status_count(s, 429),
                "5xx": five_xx(s),
                "in_flight": (s or {}).get("in_flight", 0),
            }
        self.timeline.append(row)
        if self.at_first_minute is None and t >= self.sc.first_minute:
            self.at_first_minute = snaps

    def server_rss_mb(self) -> float:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [self.server.ps, *self.server.ps.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        return round(total / 2**20, 1)

    def fire_events(self, t: float, snaps: list[dict[str, Any] | None]) -> None:
        done = sum(status_count(s, 200) for s in snaps) / self.sc.lines
        while self.pending and done >= self.pending[0].at:
            ev = self.pending.pop(0)
            fake = self.fakes[ev.fake]
            if ev.action == "outage":
                post_json(fake.url + "/_fake/config", {"outage_seconds": ev.seconds})
            elif ev.action == "kill":
                fake.kill(t)
            self.events_done.append({"t": round(t, 2), "action": ev.action, "fake": fake.spec.name,
                                     "done": round(done, 3), "seconds": ev.seconds})
            print(f"  [{self.sc.name}] t={t:.1f}s {ev.action} {fake.spec.name} at {done:.0%} answered",
                  flush=True)

    def go(self, input_path: Path) -> dict[str, Any]:
        with input_path.open("rb") as f:
            uploaded = self.client.files.create(file=f, purpose="batch")
        load_before = os.getloadavg()[0]
        cpu0 = self.server.cpu_seconds()
        self.t0 = time.monotonic()
        batch = self.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        profiler = None
        if self.args.py_spy:
            out = self.args.work / f"pyspy-{self.sc.name}.txt"
            profiler = start_profiler(self.server.pid, self.args.py_spy, out)
        limit, next_sample, next_print = self.limit_s(), 0.0, 10.0
        try:
            while batch.status not in TERMINAL:
                t = time.monotonic() - self.t0
                if t > limit:
                    raise BenchError(f"{self.sc.name}: batch still {batch.status} after {limit:.0f}s")
                self.server.check_alive()
                if t >= next_sample:
                    self.sample(t)
                    next_sample += 1.0
                elif self.pending:  # events fire on progress: check it at every poll
                    self.sample(t, record=False)
                if t >= next_print:
                    c = batch.request_counts
                    print(f"  [{self.sc.name}] t={t:.0f}s {batch.status} "
                          f"{c.completed if c else 0}/{self.sc.lines}", flush=True)
                    next_print += 30.0
                time.sleep(POLL)
                batch = self.client.batches.retrieve(batch.id)
            wall = time.monotonic() - self.t0
        finally:
            if profiler is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    profiler.wait(timeout=self.args.py_spy + 30)
                if profiler.poll() is None:
                    profiler.terminate()
                    profiler.wait()
        cpu = self.server.cpu_seconds() - cpu0
        self.sample(wall)
        out = self.client.files.content(batch.output_file_id).content if batch.output_file_id else b""
        err = self.client.files.content(batch.error_file_id).content if batch.error_file_id else b""
        return {"status": batch.status, "wall_s": wall, "server_cpu_s": cpu,
                "load_1min": (load_before, os.getloadavg()[0]), "out": out, "err": err}


def upstream_figures(run: Run, wall: float) -> dict[str, Any]:
    final = [f.last for f in run.fakes]
    requests = sum(int((s or {}).get("requests", 0)) for s in final)
    n429 = sum(status_count(s, 429) for s in final)
    fig: dict[str, Any] = {
        "upstream_requests": requests,
        "upstream_429": n429,
        "upstream_5xx": sum(five_xx(s) for s in final),
        "repeated_bodies": sum(int((s or {}).get("repeated_bodies", 0)) for s in final),
        "max_in_flight": [int((s or {}).get("max_in_flight", 0)) for s in final],
        "ok_by_upstream": {f.spec.name: status_count(f.last, 200) for f in run.fakes},
    }
    if run.at_first_minute is not None and wall > run.sc.first_minute:
        r60 = sum(int((s or {}).get("requests", 0)) for s in run.at_first_minute)
        q60 = sum(status_count(s, 429) for s in run.at_first_minute)
        fig["requests_after_1st_min"] = requests - r60
        fig["upstream_429_after_1st_min"] = n429 - q60
    return fig


def run_batchd(
    sc: Scenario, args: argparse.Namespace, input_path: Path, ids: list[str], tag: str,
    fakes: list[FakeProc] | None = None,
) -> dict[str, Any]:
    """Start fakes (unless given) and a server, run one batch, stop the server (and own fakes)."""
    procs: list[Proc] = []
    args.procs.append(procs)
    try:
        if fakes is None:
            fakes = [FakeProc(spec, args.work, procs) for spec in sc.fakes]
        else:
            for f in fakes:
                post_json(f.url + "/_fake/reset", {})
                f.last = None
        rev = revision()  # src/ moves while a long run goes on: record what each server ran
        server, port = start_server(sc, args.work, fakes, procs, tag)
        sampler = RssSampler(server.pid)
        sampler.start()
        try:
            run = Run(sc, fakes, server, port, args)
            res = run.go(input_path)
        finally:
            sampler.stop()
        server.stop()
        log = server.log_tail(400_000)
        res["server_log_errors"] = sum(1 for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln)
        res["peak_rss_mb"] = sampler.peak / 2**20
        res.update(check_lines(ids, res.pop("out"), res.pop("err")))
        res.update(upstream_figures(run, res["wall_s"]))
        res["lines_per_s"] = sc.lines / res["wall_s"]
        res["timeline"] = run.timeline
        res["revision"] = rev
        res["events"] = run.events_done
        return res
    finally:
        for p in reversed(procs):  # the server, and the fakes this call started
            p.stop()


# --------------------------------------------------------------------------- client-side runs


async def _pattern(input_path: Path, output_path: Path, base_url: str, concurrency: int) -> dict[str, Any]:
    """The seeds' recommended pattern, as written there (same concurrency as batchd)."""
    from openai import AsyncOpenAI, RateLimitError

    client = AsyncOpenAI(base_url=base_url, api_key="bench")
    sem = asyncio.Semaphore(concurrency)

    async def run_one(job: dict[str, Any]) -> dict[str, Any]:
        async with sem:
            for _attempt in range(6):
                try:
                    r = await client.chat.completions.create(**job["body"])
                    return {"id": job["custom_id"], "output": r.choices[0].message.content}
                except RateLimitError as e:
                    retry = int(e.response.headers.get("retry-after", 1)) + random.random()
                    await asyncio.sleep(retry)
            raise RuntimeError(f"job {job['custom_id']} exhausted retries")

    t0, cpu0 = time.monotonic(), time.process_time()
    with input_path.open("rb") as f:
        jobs = [orjson.loads(line) for line in f if line.strip()]
    results = await asyncio.gather(*(run_one(j) for j in jobs))
    with output_path.open("wb") as w:
        for res in results:
            w.write(orjson.dumps(res) + b"\n")
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    await client.close()
    return {"wall_s": wall, "cpu_s": cpu, "lines": len(results)}


def _ceiling(input_path: Path, base_url: str, concurrency: int) -> dict[str, Any]:
    from throughput import _ceiling as ceiling_loop

    with input_path.open("rb") as f:
        bodies = [orjson.dumps(orjson.loads(line)["body"]) for line in f if line.strip()]
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=factory) as runner:
        wall, bad = runner.run(ceiling_loop(base_url + "/chat/completions", bodies, concurrency))
    return {"wall_s": wall, "cpu_s": time.process_time() - cpu0, "lines": len(bodies), "non_200": bad}


async def _reqwest_loop(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, int]:
    """The bare loop again with pyreqwest, the client batchd uses by default: what batchd's
    own HTTP client could do with no bookkeeping at all."""
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder
    from throughput import fan_out

    timeout = timedelta(seconds=300)
    builder = ClientBuilder().max_connections(concurrency).no_proxy()
    async with builder.default_headers({"Content-Type": "application/json"}).build() as client:

        async def post(body: bytes) -> int:
            resp = await client.post(url).body_bytes(body).timeout(timeout).build().send()
            await resp.bytes()
            return int(resp.status)

        return await fan_out(bodies, concurrency, post)


def _ceiling_reqwest(input_path: Path, base_url: str, concurrency: int) -> dict[str, Any]:
    with input_path.open("rb") as f:
        bodies = [orjson.dumps(orjson.loads(line)["body"]) for line in f if line.strip()]
    import uvloop

    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        wall, bad = runner.run(_reqwest_loop(base_url + "/chat/completions", bodies, concurrency))
    return {"wall_s": wall, "cpu_s": time.process_time() - cpu0, "lines": len(bodies), "non_200": bad}


def client_main(args: argparse.Namespace) -> int:
    """``--client pattern|ceiling``: run in its own process so its peak RSS is its own."""
    inp, url = Path(args.input), args.url
    if args.client == "pattern":
        res = asyncio.run(_pattern(inp, Path(args.output), url, args.concurrency))
    elif args.client == "ceiling-reqwest":
        res = _ceiling_reqwest(inp, url, args.concurrency)
    else:
        res = _ceiling(inp, url, args.concurrency)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_client(kind: str, fake: FakeProc, input_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    post_json(fake.url + "/_fake/reset", {})
    out_path = args.work / f"{kind}-output.jsonl"
    argv = [sys.executable, str(Path(__file__).resolve()), "--client", kind, "--input", str(input_path),
            "--output", str(out_path), "--url", fake.url + "/v1", "--concurrency", str(CONCURRENCY)]
    procs: list[Proc] = []
    args.procs.append(procs)
    proc = Proc(kind, argv, clean_env(), args.work / f"{kind}.log")
    procs.append(proc)
    sampler = RssSampler(proc.pid, interval=0.05)
    sampler.start()
    try:
        rc = proc.proc.wait(timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{kind} still running after 900 s") from exc
    finally:
        sampler.stop()
        proc.stop()
    lines = [ln for ln in proc.log_tail(20_000).splitlines() if ln.startswith("RESULT ")]
    if rc != 0 or not lines:
        raise BenchError(f"{kind} exited {rc}:\n{proc.log_tail()}")
    res = dict(json.loads(lines[-1][len("RESULT "):]))
    res["lines_per_s"] = res["lines"] / res["wall_s"]
    res["peak_rss_mb"] = sampler.peak / 2**20
    res["upstream"] = fake.sample()
    return res


# --------------------------------------------------------------------------- scenarios to rows


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def base_ok(r: dict[str, Any]) -> bool:
    return r["status"] == "completed" and r["ids_ok"]


def judge(sc: Scenario, r: dict[str, Any]) -> tuple[bool, str]:
    ratio = r["wall_s"] / sc.ideal_s if sc.ideal_s else None
    if sc.name.startswith("rpm"):
        after = r.get("requests_after_1st_min")
        share = r.get("upstream_429_after_1st_min", 0) / after if after else 0.0
        r["429_share_after_1st_min"] = share
        note = f"429s after 1st min: {share:.2%} of {after or 0} requests"
        return base_ok(r) and ratio is not None and ratio <= 1.03 and share <= 0.01, note
    if sc.name == "latency":
        return base_ok(r) and ratio is not None and ratio <= 1.10, f"max in flight {r['max_in_flight']}"
    if sc.name == "faults":
        ev = r["events"][0] if r["events"] else None
        note = (f"outage {ev['seconds']:.0f}s at t={ev['t']:.0f}s; ideal+outage "
                f"{sc.ideal_s + ev['seconds']:.0f}s; {r['upstream_5xx']} 5xx" if ev and sc.ideal_s
                else "outage never started")
        return base_ok(r) and r["failed_lines"] == 0 and ev is not None, note
    if sc.name == "two-upstreams":
        ok_by = r["ok_by_upstream"]
        big, small = ok_by.get("big", 0), ok_by.get("small", 0)
        split = big / small if small else float("inf")
        r["split"] = split
        note = f"200s big/small {big}/{small} = {split:.2f}:1"
        return base_ok(r) and abs(split - 3.0) <= 0.15 and r["failed_lines"] == 0, note
    if sc.name == "two-upstreams-kill":
        ev = r["events"][0] if r["events"] else None
        ok_by = r["ok_by_upstream"]
        note = (f"small killed at t={ev['t']:.0f}s ({ev['done']:.0%}); 200s {ok_by}" if ev
                else "kill never happened")
        return base_ok(r) and r["failed_lines"] == 0 and ev is not None, note
    return base_ok(r), ""


def row(sc: Scenario, r: dict[str, Any], ok: bool, note: str) -> dict[str, Any]:
    return {
        "scenario": sc.name,
        "lines": sc.lines,
        "ideal_s": sc.ideal_s,
        "batchd_s": r["wall_s"],
        "ratio": r["wall_s"] / sc.ideal_s if sc.ideal_s else None,
        "429": r["upstream_429"],
        "429_after": r.get("upstream_429_after_1st_min"),
        "failed": r["failed_lines"] + r["missing"],
        "repeated": r["repeated_bodies"],
        "result": verdict(ok),
        "target": sc.target,
        "note": note + (f"; status {r['status']}" if r["status"] != "completed" else "")
        + ("" if r["ids_ok"] else f"; ids NOT exactly once ({r['missing']} missing, "
           f"{r['duplicated']} duplicated)")
        + (f"; {r['server_log_errors']} server ERROR log lines" if r["server_log_errors"] else "")
        + f"; server at {r['revision']}",
    }


def prepare_input(args: argparse.Namespace, lines: int) -> tuple[Path, list[str]]:
    path = args.work / f"input-{lines}.jsonl"
    if path.exists():
        return path, [f"req-{i}" for i in range(lines)]
    ids, _bodies = write_input(path, lines)
    return path, ids


def run_simple(sc: Scenario, args: argparse.Namespace) -> list[dict[str, Any]]:
    path, ids = prepare_input(args, sc.lines)
    print(f"== {sc.name}: {sc.lines:,} lines", flush=True)
    procs: list[Proc] = []
    args.procs.append(procs)
    try:
        fakes = [FakeProc(spec, args.work, procs) for spec in sc.fakes]
        r = run_batchd(sc, args, path, ids, sc.name, fakes=fakes)
        ok, note = judge(sc, r)
        if sc.name == "latency" and not args.no_control:
            # Control: what a bare aiohttp loop gets from the same fake on this machine now.
            c = run_client("ceiling", fakes[0], path, args)
            r["control"] = c
            assert sc.ideal_s is not None
            note += (f"; control (bare aiohttp loop, same fake, 64 in flight): {c['wall_s']:.1f} s = "
                     f"{c['wall_s'] / sc.ideal_s:.3f}x ideal, 429s {status_count(c['upstream'], 429)}")
    finally:
        for p in reversed(procs):
            p.stop()
    args.raw[sc.name] = r
    return [row(sc, r, ok, note)]


def us(cpu_s: float, lines: int) -> str:
    return f"{cpu_s / lines * 1e6:,.0f}"


def run_zero_latency(scs: list[Scenario], args: argparse.Namespace) -> list[dict[str, Any]]:
    one, ten = scs
    procs: list[Proc] = []
    args.procs.append(procs)
    fake = FakeProc(one.fakes[0], args.work, procs)
    rows = []
    try:
        path, ids = prepare_input(args, one.lines)
        print(f"== {one.name}: {one.lines:,} lines (batchd, then pattern, then the two ceilings)", flush=True)
        b = run_batchd(one, args, path, ids, one.name, fakes=[fake])
        p = run_client("pattern", fake, path, args)
        c = run_client("ceiling", fake, path, args)
        cr = run_client("ceiling-reqwest", fake, path, args)
        args.raw[one.name] = {"batchd": b, "pattern": p, "ceiling": c, "ceiling_reqwest": cr}
        vs_p, vs_c = b["lines_per_s"] / p["lines_per_s"], b["lines_per_s"] / c["lines_per_s"]
        ok = base_ok(b) and vs_p >= 10 and vs_c >= 0.6
        note = (f"lines/s batchd {b['lines_per_s']:,.0f}, pattern {p['lines_per_s']:,.0f}, "
                f"ceiling {c['lines_per_s']:,.0f}: batchd/pattern {vs_p:.1f}x, batchd/ceiling {vs_c:.0%}; "
                f"peak RSS batchd {b['peak_rss_mb']:.0f} MB, pattern {p['peak_rss_mb']:.0f} MB, "
                f"ceiling {c['peak_rss_mb']:.0f} MB: batchd/pattern "
                f"{b['peak_rss_mb'] / p['peak_rss_mb']:.2f}, batchd/ceiling "
                f"{b['peak_rss_mb'] / c['peak_rss_mb']:.2f}; CPU µs/line (less load-sensitive): batchd "
                f"server {us(b['server_cpu_s'], one.lines)}, pattern {us(p['cpu_s'], one.lines)}, "
                f"ceiling {us(c['cpu_s'], one.lines)}; bare pyreqwest loop (batchd's client) "
                f"{cr['lines_per_s']:,.0f} lines/s, {us(cr['cpu_s'], one.lines)} µs/line: batchd/it "
                f"{b['lines_per_s'] / cr['lines_per_s']:.0%}; load {b['load_1min'][0]:.1f}")
        rows.append(row(one, b, ok, note))
        if not args.no_10x:
            path10, ids10 = prepare_input(args, ten.lines)
            print(f"== {ten.name}: {ten.lines:,} lines (memory flatness)", flush=True)
            b10 = run_batchd(ten, args, path10, ids10, ten.name, fakes=[fake])
            args.raw[ten.name] = b10
            growth = b10["peak_rss_mb"] / b["peak_rss_mb"]
            ok10 = base_ok(b10) and growth <= 1.25
            note10 = (f"peak RSS {b10['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB at "
                      f"{one.lines:,} lines ({growth:.2f}x); {b10['lines_per_s']:,.0f} lines/s")
            rows.append(row(ten, b10, ok10, note10))
    finally:
        for p_ in reversed(procs):
            p_.stop()
    return rows


# --------------------------------------------------------------------------- report


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "lines", "ideal s", "batchd s", "ratio", "429s", "429s after 1st min",
            "failed lines", "repeated bodies", "target", "result"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["scenario"], fmt(r["lines"], ","), fmt(r["ideal_s"], ".1f"), fmt(r["batchd_s"], ".1f"),
                 fmt(r["ratio"], ".3f"), fmt(r["429"], ","), fmt(r["429_after"], ","), fmt(r["failed"], ","),
                 fmt(r["repeated"], ","), r["target"], f"**{r['result']}**"]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += [f"- {r['scenario']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def revision() -> str:
    """HEAD, plus a hash of the uncommitted src/ diff when there is one (others edit src/)."""
    rev = git_revision()
    if rev.endswith("+dirty"):
        root = Path(__file__).resolve().parents[1]
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            diff = subprocess.run(["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True,
                                  check=True).stdout
            rev += f" (src diff {hashlib.sha1(diff).hexdigest()[:8]})"
    return rev


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(scenarios(False))
    p.add_argument("--scenario", action="append", choices=names, help="repeatable; default: all")
    p.add_argument("--quick", action="store_true", help="~5x smaller runs, for development")
    p.add_argument("--no-10x", action="store_true", help="skip the 10x-lines memory run of zero-latency")
    p.add_argument("--no-control", action="store_true",
                   help="skip the bare-aiohttp control run against the latency scenario's fake")
    p.add_argument("--json", metavar="PATH", help="also write every figure (timelines included) as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    p.add_argument("--py-spy", type=int, default=0, metavar="SECONDS",
                   help="record each batchd server with py-spy for SECONDS after create (raw format)")
    # Internal: a client-side run in its own process.
    p.add_argument("--client", choices=["pattern", "ceiling", "ceiling-reqwest"], help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.client:
        return client_main(args)

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)

    all_scenarios = scenarios(args.quick)
    chosen = args.scenario or list(all_scenarios)
    args.work = Path(tempfile.mkdtemp(prefix="batchd-pacing-"))
    args.procs, args.raw = [], {}
    rows: list[dict[str, Any]] = []
    ok = False
    print(f"batchd {revision()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"work dir {args.work}", flush=True)
    try:
        for name in chosen:
            scs = all_scenarios[name]
            try:
                rows += run_zero_latency(scs, args) if name == "zero-latency" else run_simple(scs[0], args)
            except BenchError as exc:
                print(f"BENCH ERROR in {name}: {exc}", file=sys.stderr, flush=True)
                rows.append({"scenario": name, "lines": scs[0].lines, "ideal_s": scs[0].ideal_s,
                             "batchd_s": None, "ratio": None, "429": None, "429_after": None,
                             "failed": None, "repeated": None, "result": "FAIL",
                             "target": scs[0].target, "note": f"bench error: {str(exc)[:300]}"})
        print()
        print(f"## batchd pacing ({revision()}, {os.cpu_count()} cores"
              f"{', --quick' if args.quick else ''})\n")
        print(table(rows))
        ok = all(r["result"] == "PASS" for r in rows)
        return 0 if ok else 1
    finally:
        for procs in reversed(args.procs):
            for proc in reversed(procs):
                proc.stop()
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"revision": revision(), "cores": os.cpu_count(), "quick": args.quick,
                 "rows": rows, "raw": args.raw}, indent=1, default=str))
        if args.keep or not ok:
            print(f"logs and data kept in {args.work}", file=sys.stderr)
        else:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
