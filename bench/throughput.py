"""End-to-end throughput of batchd against a zero-latency FakeUpstream (issue #2).

    python bench/throughput.py [--lines 100000] [--concurrency 64]

Generates an N-line ``/v1/chat/completions`` JSONL, starts ``batchd fake-upstream`` and
``batchd serve`` as subprocesses on free ports (temporary data dir), uploads the file with the
official ``openai`` SDK, creates a batch, polls it to a terminal status, downloads the output
and error files and checks that every ``custom_id`` appears exactly once across them. The
server's RSS (children included) is sampled every 0.1 s.

Then, on the same file and the same FakeUpstream (batchd stopped, stats reset), a "ceiling":
a bare aiohttp loop (one ClientSession, a semaphore of the same concurrency) that POSTs each
line's body and keeps nothing. batchd/ceiling says how much of the client-side budget the
server's bookkeeping costs.

Exit status 0 only when the batch completed and every custom_id came back exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import psutil  # type: ignore[import-untyped]

TERMINAL = {"completed", "failed", "expired", "cancelled"}


# --------------------------------------------------------------------------- helpers


class BenchError(RuntimeError):
    """The run is wrong (not merely slow): missing/duplicated ids, a failed batch, ..."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def get_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def write_input(path: Path, lines: int) -> tuple[list[str], list[bytes]]:
    """The batch file; returns the custom_ids and each line's body as sent upstream."""
    ids, bodies = [], []
    with path.open("wb") as f:
        for i in range(lines):
            cid = f"req-{i}"
            body = {
                "model": "fake-model",
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 16,
            }
            f.write(
                orjson.dumps(
                    {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + b"\n"
            )
            ids.append(cid)
            bodies.append(orjson.dumps(body))
    return ids, bodies


class Proc:
    """A subprocess with its output in a log file; stopped by ``stop`` (idempotent)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def new_errors(self, pos: int) -> tuple[int, list[str]]:
        """(new end position, ERROR/Traceback lines with context) in the log after ``pos``."""
        with self.log_path.open("rb") as f:
            f.seek(pos)
            data = f.read(8 * 2**20)
        lines = data.decode(errors="replace").splitlines()
        hits = [i for i, ln in enumerate(lines) if " ERROR " in ln or ln.startswith("Traceback")]
        context = [ln for i in hits[:2] for ln in lines[i : i + 6]]
        return pos + len(data), context

    def cpu_seconds(self) -> float:
        """User+system CPU of the process and its children so far (0 once it is gone)."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            for p in [self.ps, *self.ps.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(name="rss-sampler", daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        self.peak = max(self.peak, total)
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------- batchd run


def run_batchd(
    args: argparse.Namespace,
    work: Path,
    input_path: Path,
    ids: list[str],
    fake_url: str,
    fake: Proc,
    procs: list[Proc],
) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "BATCHD_PORT": str(port),
        "BATCHD_DATA_DIR": str(work / "data"),
        "BATCHD_UPSTREAM_URL": fake_url + "/v1",
        "BATCHD_UPSTREAM_CONCURRENCY": str(args.concurrency),
    }
    server = Proc(
        "batchd serve",
        [sys.executable, "-m", "batchd", "serve", "--log-level", "warning"],
        env,
        work / "server.log",
    )
    procs.append(server)

    def healthy() -> bool:
        server.check_alive()
        return http_ok(f"http://127.0.0.1:{port}/health")

    wait_until(healthy, 60, "batchd /health")
    sampler = RssSampler(server.pid)
    sampler.start()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600
    )
    size = input_path.stat().st_size
    result: dict[str, Any] = {"server_pid": server.pid}
    profiler: subprocess.Popen[bytes] | None = None
    try:
        t = time.monotonic()
        with input_path.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        upload_s = time.monotonic() - t

        cpu0_server, cpu0_fake = server.cpu_seconds(), fake.cpu_seconds()
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        if args.py_spy:
            profiler = start_profiler(args, server.pid)
        seen_in_progress: float | None = None
        deadline = t0 + args.timeout
        log_pos, next_log_check = 0, t0 + 1.0
        while batch.status not in TERMINAL:
            if time.monotonic() > deadline:
                raise BenchError(f"batch still {batch.status} after {args.timeout}s")
            server.check_alive()
            if not args.allow_log_errors and time.monotonic() >= next_log_check:
                # A server that logs errors while it runs is wrong, not slow: stop early.
                log_pos, bad = server.new_errors(log_pos)
                if bad:
                    raise BenchError("server logged errors during the run:\n" + "\n".join(bad[:12]))
                next_log_check = time.monotonic() + 1.0
            time.sleep(args.poll)
            batch = client.batches.retrieve(batch.id)
            if seen_in_progress is None and batch.status != "validating":
                seen_in_progress = time.monotonic() - t0
        wall = time.monotonic() - t0
        cpu_server = server.cpu_seconds() - cpu0_server
        cpu_fake = fake.cpu_seconds() - cpu0_fake
        load_after = os.getloadavg()[0]
        sampler.sample()

        stats = get_json(fake_url + "/_fake/stats")

        t = time.monotonic()
        out = client.files.content(batch.output_file_id).content if batch.output_file_id else b""
        err = client.files.content(batch.error_file_id).content if batch.error_file_id else b""
        download_s = time.monotonic() - t
        check = check_results(ids, out, err)
        counts = batch.request_counts
        result.update(
            batch_id=batch.id,
            status=batch.status,
            wall_s=wall,
            lines_per_s=len(ids) / wall,
            validation_api_s=(batch.in_progress_at or batch.created_at) - batch.created_at,
            validation_seen_s=seen_in_progress,
            upload_s=upload_s,
            upload_mb_s=size / 1e6 / upload_s,
            download_s=download_s,
            output_mb=(len(out) + len(err)) / 1e6,
            peak_rss_mb=sampler.peak / 2**20,
            rss_samples=sampler.samples,
            server_cpu_s=cpu_server,
            fake_cpu_s=cpu_fake,
            load_1min=(load_before, load_after),
            fake_requests=stats["requests"],
            fake_repeated_bodies=stats["repeated_bodies"],
            fake_by_status=stats["by_status"],
            fake_max_in_flight=stats["max_in_flight"],
            request_counts={
                "total": counts.total,
                "completed": counts.completed,
                "failed": counts.failed,
            }
            if counts
            else None,
            **check,
        )
    finally:
        sampler.stop()
        if profiler is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(timeout=args.py_spy + 30)
            if profiler.poll() is None:
                profiler.terminate()
                profiler.wait()
        server.stop()
    log = server.log_tail(200_000)
    bad = [ln for ln in log.splitlines() if "ERROR" in ln or "Traceback" in ln]
    result["server_log_errors"] = len(bad)
    result["server_log_sample"] = bad[:5]
    return result


def start_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.py_spy_out)
    return subprocess.Popen(
        [exe, "record", "-d", str(args.py_spy), "-o", str(out), "--format", "raw", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=(out.with_suffix(".log")).open("wb"),
    )


def check_results(ids: list[str], out: bytes, err: bytes) -> dict[str, Any]:
    """Every custom_id exactly once across output and error; raise BenchError if not."""
    seen: collections.Counter[str] = collections.Counter()
    out_lines = err_lines = 0
    for data, is_out in ((out, True), (err, False)):
        for line in data.splitlines():
            if not line.strip():
                continue
            obj = orjson.loads(line)
            seen[obj["custom_id"]] += 1
            if is_out:
                out_lines += 1
                if obj.get("error") is not None or obj["response"]["status_code"] != 200:
                    raise BenchError(f"output line is not a 200 success: {line[:300]!r}")
            else:
                err_lines += 1
    expected = set(ids)
    missing = expected - seen.keys()
    extra = seen.keys() - expected
    dup = {k: n for k, n in seen.items() if n > 1}
    if missing or extra or dup:
        raise BenchError(
            f"custom_id check failed: {len(missing)} missing (e.g. {sorted(missing)[:5]}), "
            f"{len(extra)} unexpected (e.g. {sorted(extra)[:5]}), "
            f"{len(dup)} duplicated (e.g. {list(dup.items())[:5]})"
        )
    return {"output_lines": out_lines, "error_lines": err_lines, "ids_ok": True}


# --------------------------------------------------------------------------- ceiling


async def fan_out(
    bodies: list[bytes], concurrency: int, post: Callable[[bytes], Awaitable[int]]
) -> tuple[float, int]:
    """The bare client loop: a semaphore of ``concurrency``, one task per body; ``post``
    returns the answer's status. Returns (seconds, answers other than 200)."""
    sem = asyncio.Semaphore(concurrency)
    bad = 0

    async def one(body: bytes) -> None:
        nonlocal bad
        try:
            bad += await post(body) != 200
        finally:
            sem.release()

    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    for body in bodies:
        await sem.acquire()
        task = asyncio.create_task(one(body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return time.monotonic() - t0, bad


async def _ceiling(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, int]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, skip_auto_headers=("User-Agent",)
    ) as session:

        async def post(body: bytes) -> int:
            async with session.post(url, data=body) as resp:
                await resp.read()
                return resp.status

        return await fan_out(bodies, concurrency, post)


def run_ceiling(fake_url: str, bodies: list[bytes], concurrency: int, fake: Proc) -> dict[str, Any]:
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop  # uvicorn (batchd serve) runs on uvloop too
    except ImportError:
        loop_factory = None
    me = psutil.Process()
    cpu0_me, cpu0_fake = sum(me.cpu_times()[:2]), fake.cpu_seconds()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        wall, bad = runner.run(_ceiling(fake_url + "/v1/chat/completions", bodies, concurrency))
    cpu_me, cpu_fake = sum(me.cpu_times()[:2]) - cpu0_me, fake.cpu_seconds() - cpu0_fake
    if bad:
        raise BenchError(f"ceiling: {bad} non-200 answers from the fake upstream")
    return {"wall_s": wall, "lines_per_s": len(bodies) / wall, "client_cpu_s": cpu_me, "fake_cpu_s": cpu_fake}


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, size: int, b: dict[str, Any], c: dict[str, Any] | None) -> None:
    rows = [
        ("batchd revision", git_revision()),
        ("lines", f"{args.lines:,}"),
        ("input file", f"{size / 1e6:.1f} MB"),
        ("upstream concurrency", str(args.concurrency)),
        ("batch status", b["status"]),
        ("wall, create -> terminal", f"{b['wall_s']:.1f} s"),
        ("lines/s (batchd)", f"{b['lines_per_s']:,.0f}"),
        ("validation (in_progress_at - created_at)", f"{b['validation_api_s']} s"),
        ("validation (seen by polling)", f"{b['validation_seen_s']:.2f} s"),
        ("upload", f"{b['upload_mb_s']:.1f} MB/s ({b['upload_s']:.2f} s)"),
        ("download output+error", f"{b['output_mb']:.1f} MB in {b['download_s']:.2f} s"),
        ("peak RSS of server", f"{b['peak_rss_mb']:.0f} MB"),
        (
            "server CPU during run",
            f"{b['server_cpu_s']:.1f} s ({b['server_cpu_s'] / b['wall_s']:.0%} of one core)",
        ),
        (
            "fake upstream CPU during run",
            f"{b['fake_cpu_s']:.1f} s ({b['fake_cpu_s'] / b['wall_s']:.0%} of one core)",
        ),
        ("load average (1 min) before / after", "{:.1f} / {:.1f}".format(*b["load_1min"])),
        ("FakeUpstream requests", f"{b['fake_requests']:,}"),
        ("FakeUpstream repeated_bodies", f"{b['fake_repeated_bodies']:,}"),
        ("output / error lines", f"{b['output_lines']:,} / {b['error_lines']:,}"),
        ("every custom_id exactly once", "yes" if b["ids_ok"] else "NO"),
        ("server log ERROR lines", str(b["server_log_errors"])),
    ]
    if c is not None:
        rows += [
            ("ceiling: bare aiohttp loop lines/s", f"{c['lines_per_s']:,.0f} ({c['wall_s']:.1f} s)"),
            ("ceiling: client / fake upstream CPU", f"{c['client_cpu_s']:.1f} s / {c['fake_cpu_s']:.1f} s"),
            ("batchd / ceiling", f"{b['lines_per_s'] / c['lines_per_s']:.2f}"),
        ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"batchd throughput ({os.cpu_count()} cores)")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")


def git_revision() -> str:
    """Short HEAD commit of the checkout, with ``+dirty`` when src/ has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the batch")
    p.add_argument("--poll", type=float, default=0.2, help="batch polling interval, seconds")
    p.add_argument("--no-ceiling", action="store_true", help="skip the bare aiohttp ceiling")
    p.add_argument(
        "--py-spy",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also record the server with py-spy for SECONDS after the batch is created",
    )
    p.add_argument("--py-spy-out", default="/tmp/batchd-prof.txt", help="py-spy raw output file")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    p.add_argument(
        "--allow-log-errors", action="store_true", help="do not stop the run when the server logs an ERROR"
    )
    args = p.parse_args(argv)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below stops the subprocesses.
    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)

    work = Path(tempfile.mkdtemp(prefix="batchd-bench-"))
    procs: list[Proc] = []
    ok = False
    try:
        input_path = work / "input.jsonl"
        ids, bodies = write_input(input_path, args.lines)
        size = input_path.stat().st_size

        fake_port = free_port()
        fake_url = f"http://127.0.0.1:{fake_port}"
        fake = Proc(
            "batchd fake-upstream",
            [sys.executable, "-m", "batchd", "fake-upstream", "--port", str(fake_port), "--latency", "0"],
            dict(os.environ),
            work / "fake.log",
        )
        procs.append(fake)

        def fake_up() -> bool:
            fake.check_alive()
            return http_ok(fake_url + "/health")

        wait_until(fake_up, 30, "fake upstream /health")

        b = run_batchd(args, work, input_path, ids, fake_url, fake, procs)
        if b["status"] != "completed":
            raise BenchError(f"batch ended {b['status']}, not completed")
        if b["fake_requests"] != args.lines:
            print(f"note: FakeUpstream counted {b['fake_requests']} requests for {args.lines} lines")

        c = None
        if not args.no_ceiling:
            get_json(fake_url + "/_fake/reset", method="POST")
            c = run_ceiling(fake_url, bodies, args.concurrency, fake)
        report(args, size, b, c)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "lines": args.lines,
                        "concurrency": args.concurrency,
                        "revision": git_revision(),
                        "input_bytes": size,
                        "cores": os.cpu_count(),
                        "batchd": b,
                        "ceiling": c,
                    },
                    indent=2,
                    default=str,
                )
            )
        if b["server_log_errors"]:
            print(
                f"server log has {b['server_log_errors']} ERROR lines, e.g.:",
                *b["server_log_sample"],
                sep="\n",
            )
            return 1
        ok = True
        return 0
    except BenchError as exc:
        print(f"BENCH FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep or not ok:
            print(f"logs and data kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
