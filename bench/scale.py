"""Big inputs and many batches (issue #5): memory, validation speed, dispatch, fairness.

    python bench/scale.py [--lines 4000000] [--small-lines 400000] [--batches 1000]
                          [--projects 10] [--dispatch-seconds 60] [--full-dispatch]

1. For a small and a big input (``--small-lines`` and ``--lines`` lines of about 500 bytes:
   200 MB and 2 GB by default), each on a fresh ``batchd serve`` (SQLite + local directory)
   against a zero-latency ``batchd fake-upstream`` (its own process): generate the file in a
   temporary directory (streamed), upload it with the SDK's ``client.uploads.upload_file_chunked``,
   create a batch and time validation (created -> in_progress, polled every 0.1 s). The same file
   is then read plainly and decoded line by line with ``msgspec.json.decode`` alone in this
   process, for the ratio the issue asks for; the server's own figure (its log line: from
   claiming the job to the chunk plan written, and the file check alone) is printed too, without
   the job pick-up and the polling. Dispatch lines/s is measured over a window of
   ``--dispatch-seconds`` while the batch runs; halfway through, a 10-line batch (another
   project) is created and timed to completion. Unless ``--full-dispatch``, the big batch is
   then cancelled (a whole 4M-line dispatch takes 4M / (lines/s) seconds: printed). The
   server's RSS (the process alone, and with its children: validation workers) is sampled
   every 0.1 s with psutil.
2. ``--batches`` small batches (``--batch-lines`` lines each) from ``--projects`` projects, each
   with its own key (``batchd keys create``), created from one thread per project; prints the
   completion-time spread and Jain's fairness index across projects of the lines served per
   project while every project still had work (from the moment all batches exist until the
   first project has nothing left).

The 1-minute load average is printed with each phase: the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import openai
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BenchError, Proc, free_port, http_ok, wait_until  # noqa: E402  (bench/ is no package)

TERMINAL = {"completed", "failed", "expired", "cancelled", "cancelling"}
PAD = "x" * 330  # makes a line about 500 bytes


def load() -> float:
    return round(os.getloadavg()[0], 2)


def write_file(path: Path, lines: int, prefix: str = "req") -> int:
    """Stream ``lines`` request lines of ~500 bytes to ``path``; returns its size."""
    with path.open("wb") as f:
        buf: list[bytes] = []
        for i in range(lines):
            buf.append(
                orjson.dumps(
                    {
                        "custom_id": f"{prefix}-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": "fake-model",
                            "messages": [{"role": "user", "content": f"hello {i} {PAD}"}],
                            "max_tokens": 8,
                        },
                    }
                )
            )
            if len(buf) >= 10_000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")
    return path.stat().st_size


class Rss(threading.Thread):
    """Peak RSS of the server alone and with its children, sampled every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak_self = self.peak_tree = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(psutil.Error):
                own = self.proc.memory_info().rss
                tree = own
                for c in self.proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree += c.memory_info().rss
                self.peak_self, self.peak_tree = max(self.peak_self, own), max(self.peak_tree, tree)
            self.halt.wait(0.1)

    def stop(self) -> tuple[float, float]:
        self.halt.set()
        self.join(5)
        return self.peak_self / 2**20, self.peak_tree / 2**20


class Stack:
    """A fake upstream and a batchd server on a fresh data directory, with project keys."""

    def __init__(self, work: Path, projects: list[str], args: argparse.Namespace):
        self.work = work
        data = work / "data"
        data.mkdir(parents=True)
        env = {**os.environ, "BATCHD_DATA_DIR": str(data)}
        self.keys = {}
        for p in projects:
            out = subprocess.run(
                [sys.executable, "-m", "batchd", "keys", "create", "--project", p],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            self.keys[p] = out.stdout.split()[0]
        fport, port = free_port(), free_port()
        self.fake = Proc(
            "fake-upstream",
            [sys.executable, "-m", "batchd", "fake-upstream", "--port", str(fport)],
            dict(os.environ),
            work / "fake.log",
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{fport}/_fake/stats"), 60, "fake upstream")
        env.update(
            BATCHD_PORT=str(port),
            BATCHD_UPSTREAM_URL=f"http://127.0.0.1:{fport}/v1",
            BATCHD_UPSTREAM_CONCURRENCY=str(args.concurrency),
            BATCHD_QUOTA_MAX_ACTIVE_BATCHES="100000",
            BATCHD_QUOTA_MAX_QUEUED_LINES="100000000",
        )
        self.server = Proc(
            "batchd serve",
            [sys.executable, "-m", "batchd", "serve", "--log-level", "info"],
            env,
            work / "server.log",
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "batchd /health")
        self.base = f"http://127.0.0.1:{port}/v1"
        self.rss = Rss(self.server.pid)
        self.rss.start()

    def client(self, project: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=self.keys[project], max_retries=2, timeout=900)

    def stop(self) -> tuple[float, float]:
        peaks = self.rss.stop()
        self.server.stop()
        self.fake.stop()
        return peaks


# ------------------------------------------------------------------------ one big input


def reference_speeds(path: Path) -> tuple[float, float]:
    """(plain read MB/s, msgspec per-line decode MB/s) of the file, in this process."""
    size = path.stat().st_size
    t = time.monotonic()
    with path.open("rb") as f:
        while f.read(8 << 20):
            pass
    plain = size / 1e6 / (time.monotonic() - t)
    decode = msgspec.json.Decoder().decode
    t = time.monotonic()
    with path.open("rb") as f:
        for line in f:
            decode(line)
    return plain, size / 1e6 / (time.monotonic() - t)


def big_run(args: argparse.Namespace, root: Path, lines: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"run{lines}-", dir=root))
    path = work / "big.jsonl"
    t = time.monotonic()
    size = write_file(path, lines)
    out: dict[str, Any] = {
        "lines": lines,
        "mb": size / 1e6,
        "gen_s": time.monotonic() - t,
        "load_start": load(),
    }
    stack = Stack(work, ["big", "small"], args)
    try:
        client = stack.client("big")
        t = time.monotonic()
        up = client.uploads.upload_file_chunked(file=path, mime_type="text/jsonl", purpose="batch")
        out["upload_mb_s"] = size / 1e6 / (time.monotonic() - t)
        assert up.file is not None
        t0 = time.monotonic()
        batch = client.batches.create(
            input_file_id=up.file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status == "validating":
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        if batch.status != "in_progress":
            raise BenchError(f"batch {batch.status}: {batch.errors}")
        out["validate_s"] = time.monotonic() - t0
        out["validate_mb_s"] = size / 1e6 / out["validate_s"]
        # The server's own figure (its log line), without the job pick-up and status polling.
        took = re.findall(
            r"validated batch: in_progress \(.*?\) in ([0-9.]+)s \(file checked in ([0-9.]+)s\)",
            stack.server.log_tail(200_000),
        )
        out["server_validate_s"], out["server_check_s"] = map(float, took[-1]) if took else (None, None)
        out.update(dispatch_window(args, stack, client, batch.id, lines))
        out["load_end"] = load()
    finally:
        out["rss_server_mb"], out["rss_tree_mb"] = stack.stop()
    out["plain_mb_s"], out["msgspec_mb_s"] = reference_speeds(path)
    path.unlink()
    return out


def dispatch_window(
    args: argparse.Namespace, stack: Stack, client: openai.OpenAI, batch_id: str, lines: int
) -> dict[str, Any]:
    """Lines/s over the window, and a 10-line batch created halfway through it."""
    small = stack.client("small")
    t0, c0 = time.monotonic(), 0
    first = client.batches.retrieve(batch_id)
    c0 = first.request_counts.completed if first.request_counts else 0
    small_done: float | None = None
    small_id: str | None = None
    small_t = 0.0
    small_stamps: dict[str, int] = {}
    window = lines if args.full_dispatch else None
    while True:
        now = time.monotonic()
        b = client.batches.retrieve(batch_id)
        done = b.request_counts.completed + b.request_counts.failed if b.request_counts else 0
        if small_id is None and now - t0 >= args.dispatch_seconds / 2:
            f = small.files.create(
                file=("small.jsonl", b"".join(_line(f"s{i}") for i in range(10))), purpose="batch"
            )
            small_id = small.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
            small_t = time.monotonic()
        if small_id is not None and small_done is None:
            s = small.batches.retrieve(small_id)
            if s.status == "completed":
                small_done = time.monotonic() - small_t
                small_stamps = {
                    "validated": (s.in_progress_at or 0) - s.created_at,
                    "finalizing": (s.finalizing_at or 0) - s.created_at,
                    "completed": (s.completed_at or 0) - s.created_at,
                }
        ended = b.status in TERMINAL
        timed = window is None and now - t0 >= args.dispatch_seconds and small_done is not None
        cap = args.timeout if window is not None else args.dispatch_seconds * 10
        if ended or timed or now - t0 > cap:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    rate = (done - c0) / elapsed
    if b.status not in TERMINAL:
        client.batches.cancel(batch_id)
    return {
        "dispatch_lines_s": rate,
        "dispatch_window_s": elapsed,
        "dispatched": done,
        "full_dispatch_est_s": lines / rate if rate else None,
        "small_batch_s": small_done,
        "small_batch_stamps_s": small_stamps,
    }


def _line(cid: str) -> bytes:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": f"hi {cid}"}], "max_tokens": 8}
    return (
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
        + b"\n"
    )


def compare_validation(args: argparse.Namespace, root: Path, lines: int, rounds: int = 3) -> dict[str, Any]:
    """Same file, same moment: plain read, msgspec per line, and batchd's validator in this
    process, alternated ``rounds`` times (best of each), so machine load affects all alike.
    (Two processes are measured by the server runs above: forked here, every range process
    would first import this script again, which ``batchd serve`` avoids.)"""
    import asyncio

    from batchd.blobs import BlobStore
    from batchd.ingest.validate import validate_file

    work = Path(tempfile.mkdtemp(prefix="cmp-", dir=root))
    (work / "blobs").mkdir()
    path = work / "blobs" / "in.jsonl"
    size = write_file(path, lines)
    blobs = BlobStore.local(work / "blobs")
    kw: dict[str, Any] = {
        "endpoint": "/v1/chat/completions",
        "chunk_lines": 1000,
        "max_lines": 5_000_000,
        "max_errors": 100,
        "max_line_bytes": 50 << 20,
        "id_bound": 500_000,
    }
    best: dict[str, float] = {}
    out: dict[str, Any] = {"mb": size / 1e6, "lines": lines, "load_start": load()}
    for _ in range(rounds):
        plain, ms = reference_speeds(path)
        best["plain"] = max(best.get("plain", 0), plain)
        best["msgspec"] = max(best.get("msgspec", 0), ms)
        t = time.monotonic()
        plan = asyncio.run(validate_file(blobs, "in.jsonl", spill_dir=work, **kw))
        assert not plan.errors and plan.total == lines
        best["validate_1"] = max(best.get("validate_1", 0), size / 1e6 / (time.monotonic() - t))
    out.update({f"{k}_mb_s": v for k, v in best.items()}, load_end=load())
    path.unlink()
    return out


# ----------------------------------------------------------------------- many batches


def many_batches(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="many-", dir=root))
    projects = [f"proj{i}" for i in range(args.projects)]
    stack = Stack(work, projects, args)
    per = args.batches // args.projects
    out: dict[str, Any] = {"batches": per * args.projects, "load_start": load()}
    created: dict[str, list[str]] = {p: [] for p in projects}
    try:
        clients = {p: stack.client(p) for p in projects}

        files: dict[str, list[str]] = {p: [] for p in projects}

        def upload(p: str) -> None:
            for j in range(per):
                data = b"".join(_line(f"{p}-{j}-{i}") for i in range(args.batch_lines))
                files[p].append(clients[p].files.create(file=(f"{p}-{j}.jsonl", data), purpose="batch").id)

        def create(p: str) -> None:
            for fid in files[p]:
                b = clients[p].batches.create(
                    input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
                )
                created[p].append(b.id)

        # Files first (they start no work), then the batches as fast as they can be created,
        # so all projects are backlogged together.
        with ThreadPoolExecutor(len(projects)) as pool:
            list(pool.map(upload, projects))
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(projects)) as pool:
            list(pool.map(create, projects))
        t_all = time.monotonic()
        out["create_s"] = t_all - t0
        served_at_all = served(clients)
        first_done: tuple[float, dict[str, int]] | None = None
        while True:
            now_served = served(clients)
            if first_done is None and any(v >= per * args.batch_lines for v in now_served.values()):
                first_done = (time.monotonic(), now_served)
            if all(v >= per * args.batch_lines for v in now_served.values()):
                # Every line is served; the last batches may still be finalizing.
                times, statuses = completion_times(clients, created)
                if set(statuses) <= TERMINAL:
                    break
            if time.monotonic() - t_all > args.timeout:
                raise BenchError(f"batches still running after {args.timeout}s: {now_served}")
            time.sleep(0.5)
        out["all_done_s"] = time.monotonic() - t0
        assert first_done is not None
        share = [first_done[1][p] - served_at_all[p] for p in projects]
        out["window_s"] = first_done[0] - t_all
        out["jain"] = jain(share)
        out["served_in_window"] = share
        out["statuses"] = statuses
        out["completion_s"] = {
            "min": min(times),
            "median": statistics.median(times),
            "p95": sorted(times)[int(0.95 * (len(times) - 1))],
            "max": max(times),
        }
        out["load_end"] = load()
    finally:
        out["rss_server_mb"], out["rss_tree_mb"] = stack.stop()
    return out


TERMINAL = {"completed", "failed", "expired", "cancelled"}


def served(clients: dict[str, openai.OpenAI]) -> dict[str, int]:
    """Lines finished so far per project (all its batches)."""
    out = {}
    for p, c in clients.items():
        n = 0
        for b in c.batches.list(limit=100).data:
            if b.request_counts:
                n += b.request_counts.completed + b.request_counts.failed
        out[p] = n
    return out


def completion_times(
    clients: dict[str, openai.OpenAI], created: dict[str, list[str]]
) -> tuple[list[float], dict[str, int]]:
    times, statuses = [], {}
    for p, c in clients.items():
        for b in c.batches.list(limit=100).data:
            statuses[b.status] = statuses.get(b.status, 0) + 1
            if b.completed_at:
                times.append(float(b.completed_at - b.created_at))
        assert len(created[p]) <= 100
    return times, statuses


def jain(xs: list[int]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1 is perfectly even."""
    s, sq = sum(xs), sum(x * x for x in xs)
    return s * s / (len(xs) * sq) if sq else 1.0


# --------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=4_000_000, help="lines of the big input")
    ap.add_argument(
        "--small-lines", type=int, default=400_000, help="lines of the comparison input (0: skip)"
    )
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--projects", type=int, default=10)
    ap.add_argument("--batch-lines", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dispatch-seconds", type=float, default=60.0)
    ap.add_argument("--full-dispatch", action="store_true", help="run the big batch to the end")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--skip", default="", help="comma list of phases to skip: small,big,compare,many")
    ap.add_argument("--work", type=Path, default=None, help="directory for the temporary files")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    root = Path(tempfile.mkdtemp(prefix="batchd-scale-", dir=args.work))
    print(f"command: {' '.join(sys.argv)}\nload at start: {os.getloadavg()}", flush=True)
    runs = []
    try:
        for name, lines in (("small", args.small_lines), ("big", args.lines)):
            if name in skip or not lines:
                continue
            r = big_run(args, root, lines)
            runs.append(r)
            print(orjson.dumps(r).decode(), flush=True)
        if "compare" not in skip and args.small_lines:
            c = compare_validation(args, root, args.small_lines)
            print(orjson.dumps(c).decode(), flush=True)
            ms = c["msgspec_mb_s"]
            print(
                f"validator in one process vs msgspec, same file, alternated (best of 3): "
                f"{c['validate_1_mb_s'] / ms:.2f} (validator {c['validate_1_mb_s']:.0f} MB/s, "
                f"msgspec {ms:.0f} MB/s, plain read {c['plain_mb_s']:.0f} MB/s)",
                flush=True,
            )
        if "many" not in skip:
            m = many_batches(args, root)
            print(orjson.dumps(m).decode(), flush=True)
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(root)], check=False)
    print_table(runs)
    if "many" not in skip:
        print(
            f"\n{m['batches']} batches x {args.batch_lines} lines, {args.projects} projects: "
            f"statuses {m['statuses']}, created in {m['create_s']:.1f}s, all done {m['all_done_s']:.1f}s; "
            f"completion (created->completed) min {m['completion_s']['min']:.0f}s median "
            f"{m['completion_s']['median']:.0f}s p95 {m['completion_s']['p95']:.0f}s max "
            f"{m['completion_s']['max']:.0f}s; Jain {m['jain']:.3f} over {m['window_s']:.1f}s "
            f"(lines served per project {m['served_in_window']}); peak RSS server "
            f"{m['rss_server_mb']:.0f} MB; load {m['load_start']} -> {m['load_end']}"
        )
    print(f"load at end: {os.getloadavg()}")
    return 0


def _server_validation(r: dict[str, Any]) -> str:
    took = r.get("server_validate_s")
    return f"{took:.2f} ({r['mb'] / took / r['msgspec_mb_s']:.2f})" if took else "-"


def print_table(runs: list[dict[str, Any]]) -> None:
    if not runs:
        return
    cols = [
        ("input", lambda r: f"{r['mb']:.0f} MB / {r['lines']:,} lines"),
        ("upload MB/s", lambda r: f"{r['upload_mb_s']:.0f}"),
        ("validate MB/s", lambda r: f"{r['validate_mb_s']:.0f} ({r['validate_s']:.1f} s)"),
        ("plain read MB/s", lambda r: f"{r['plain_mb_s']:.0f}"),
        ("msgspec MB/s", lambda r: f"{r['msgspec_mb_s']:.0f}"),
        ("validate/msgspec", lambda r: f"{r['validate_mb_s'] / r['msgspec_mb_s']:.2f}"),
        ("server's validation s (/msgspec)", _server_validation),
        ("dispatch lines/s", lambda r: f"{r['dispatch_lines_s']:.0f}"),
        ("10-line batch s", lambda r: f"{r['small_batch_s']:.1f}" if r["small_batch_s"] else "-"),
        ("peak RSS server MB", lambda r: f"{r['rss_server_mb']:.0f}"),
        ("peak RSS +children MB", lambda r: f"{r['rss_tree_mb']:.0f}"),
        ("load", lambda r: f"{r['load_start']} -> {r['load_end']}"),
    ]
    print("\n| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in runs:
        print("| " + " | ".join(f(r) for _, f in cols) + " |")
    if len(runs) == 2:
        a, b = runs
        grow = b["rss_server_mb"] / a["rss_server_mb"] - 1
        print(f"\nRSS growth {a['mb']:.0f} MB -> {b['mb']:.0f} MB: server {grow:+.0%}")


if __name__ == "__main__":
    sys.exit(main())
