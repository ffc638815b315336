"""Scale-out on PostgreSQL + S3 (issue #6): lines/s with 1, 2 and 3 workers, and a fleet sharing
one upstream's requests/min limit.

    python bench/scaleout.py [--lines 20000] [--workers 1,2,3] [--skip-zero]
                             [--rpm 3000] [--rpm-lines 4000] [--skip-rpm]

Starts a moto_server (S3), a fresh database on the machine's PostgreSQL (``BATCHD_BENCH_PG``,
default postgresql://postgres@127.0.0.1:5432), ``batchd fake-upstream``, one API process
(``serve --no-worker``) and W ``batchd worker`` processes. Prints a table of W, lines/s, and for
the rpm scenario the time against N/R and the 429s FakeUpstream answered after the first minute;
then where each run's time went (validation, until the first upstream request, sending,
finalization: polled every 0.1 s) and the mean time of the workers' lease, commit, part put,
heartbeat and share queries (bench/timed_worker.py wraps them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BenchError, Proc, free_port, get_json, http_ok, wait_until, write_input  # noqa: E402

PG = os.environ.get("BATCHD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def psql(sql: str) -> None:
    subprocess.run(["psql", PG + "/postgres", "-q", "-c", sql], check=True, capture_output=True)


@contextlib.contextmanager
def fleet(work: Path, workers: int, fake_args: list[str]) -> Any:
    db = "batchd_bench_" + secrets.token_hex(4)
    psql(f"CREATE DATABASE {db}")
    s3_port, fake_port, api_port = free_port(), free_port(), free_port()
    procs: list[Proc] = []
    try:
        bin_dir = Path(sys.executable).parent
        procs.append(
            Proc("s3", [str(bin_dir / "moto_server"), "-p", str(s3_port)], dict(os.environ), work / "s3.log")
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{s3_port}/moto-api/"), 30, "moto_server")
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{s3_port}/bench", method="PUT")
        ).close()
        fake = [sys.executable, "-m", "batchd", "fake-upstream", "--port", str(fake_port), *fake_args]
        procs.append(Proc("fake", fake, dict(os.environ), work / "fake.log"))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{fake_port}/health"), 30, "fake upstream")
        env = {
            **os.environ,
            "BATCHD_DATABASE_URL": f"{PG}/{db}",
            "BATCHD_STORAGE_URL": f"s3://bench/{db}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "BATCHD_UPSTREAM_URL": f"http://127.0.0.1:{fake_port}/v1",
            "BATCHD_CHUNK_LINES": "500",
        }
        api_env = {**env, "BATCHD_PORT": str(api_port), "BATCHD_DATA_DIR": str(work / "api")}
        argv = [sys.executable, "-m", "batchd", "serve", "--no-worker", "--log-level", "warning"]
        procs.append(Proc("api", argv, api_env, work / "api.log"))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{api_port}/health"), 30, "api")
        timed = str(Path(__file__).resolve().parent / "timed_worker.py")
        for w in range(workers):
            wenv = {
                **env,
                "BATCHD_DATA_DIR": str(work / f"w{w}"),
                "BATCHD_BENCH_TIMINGS": str(work / f"w{w}.timings.json"),
            }
            procs.append(Proc(f"w{w}", [sys.executable, timed], wenv, work / f"w{w}.log"))
        # The fleet is running before work arrives, as in a deployment: the batch's clock
        # starts once every worker is ready, not while Python imports the workers.
        for p in procs[-workers:]:
            wait_until(lambda p=p: "ready" in p.log_tail(), 60, p.name)
        yield f"http://127.0.0.1:{api_port}/v1", f"http://127.0.0.1:{fake_port}"
    finally:
        for p in reversed(procs):
            p.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def run_once(work: Path, workers: int, lines: int, fake_args: list[str]) -> dict[str, Any]:
    ids, _ = write_input(work / "input.jsonl", lines)
    with fleet(work, workers, fake_args) as (api, fake):
        client = openai.OpenAI(base_url=api, api_key="bench")
        f = client.files.create(file=(work / "input.jsonl").open("rb"), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        start = time.monotonic()
        after_minute: dict[str, Any] | None = None
        marks: dict[str, float] = {}
        answered = 0
        while True:
            b = client.batches.retrieve(b.id)
            now = time.monotonic() - start
            if b.status != "validating":
                marks.setdefault("in_progress", now)
            if b.status in ("completed", "failed", "expired", "cancelled"):
                break
            stats = get_json(fake + "/_fake/stats")
            if stats["requests"]:
                marks.setdefault("first_request", now)
            if stats["by_status"].get("200", 0) > answered:
                answered = stats["by_status"]["200"]
                marks["last_answer"] = now
            if after_minute is None and now >= 60:
                after_minute = stats
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        stats = get_json(fake + "/_fake/stats")
        out = client.files.content(b.output_file_id).content if b.output_file_id else b""
    got = sorted(orjson.loads(x)["custom_id"] for x in out.splitlines())
    if b.status != "completed" or got != sorted(ids):
        raise BenchError(f"{workers} workers: status {b.status}, {len(got)} of {lines} lines")
    late = {
        k: v - (after_minute or {"by_status": {}})["by_status"].get(k, 0)
        for k, v in stats["by_status"].items()
    }
    late_requests = sum(late.values())
    timings: dict[str, list[float]] = {}
    for path in work.glob("w*.timings.json"):
        for name, (calls, seconds) in orjson.loads(path.read_bytes()).items():
            entry = timings.setdefault(name, [0, 0.0])
            entry[0] += calls
            entry[1] += seconds
    return {
        "marks": marks,
        "timings": timings,
        "workers": workers,
        "lines": lines,
        "seconds": elapsed,
        "lines_per_s": lines / elapsed,
        "429": stats["by_status"].get("429", 0),
        "429_after_60s": late.get("429", 0) if after_minute else None,
        "requests_after_60s": late_requests if after_minute else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--rpm", type=int, default=3000)
    ap.add_argument("--rpm-lines", type=int, default=4000)
    ap.add_argument("--workers", default="1,2,3", help="fleet sizes for the zero-latency runs")
    ap.add_argument("--skip-zero", action="store_true")
    ap.add_argument("--skip-rpm", action="store_true")
    args = ap.parse_args()
    print("| scenario | workers | lines | seconds | lines/s | 429s |")
    print("|---|---:|---:|---:|---:|---:|")
    results = []
    for workers in [] if args.skip_zero else [int(w) for w in args.workers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="batchd-scale-") as tmp:
            r = run_once(Path(tmp), workers, args.lines, [])
        results.append(("zero latency", r))
        print(
            f"| zero latency | {workers} | {r['lines']} | {r['seconds']:.1f} "
            f"| {r['lines_per_s']:.0f} | {r['429']} |"
        )
    if not args.skip_rpm:
        with tempfile.TemporaryDirectory(prefix="batchd-scale-") as tmp:
            os.environ["BATCHD_UPSTREAM_RPM"] = str(args.rpm)
            r = run_once(Path(tmp), 3, args.rpm_lines, ["--rpm", str(args.rpm), "--latency", "0.05"])
        results.append((f"rpm {args.rpm}", r))
        ideal = args.rpm_lines / args.rpm * 60
        share = (r["429_after_60s"] or 0) / max(1, r["requests_after_60s"] or 1)
        print(
            f"| rpm {args.rpm} shared | 3 | {r['lines']} | {r['seconds']:.1f} (ideal {ideal:.1f}, "
            f"ratio {r['seconds'] / ideal:.3f}) | {r['lines_per_s']:.0f} | {r['429']} "
            f"({r['429_after_60s']} after 60 s = {share:.2%}) |"
        )
    print_breakdown(results)
    return 0


def print_breakdown(results: list[tuple[str, dict[str, Any]]]) -> None:
    """Where each run's time went, and what the workers' database and blob calls cost."""
    print()
    print(
        "| scenario | workers | validation s | to first request s | sending s | finalize s "
        "| lease ms (calls) | commit ms (calls) | part put ms | heartbeat ms | share query ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def per_call(t: dict[str, list[float]], name: str, calls: bool = False) -> str:
        n, seconds = t.get(name, [0, 0.0])
        ms = f"{seconds / n * 1000:.1f}" if n else "-"
        return f"{ms} ({int(n)})" if calls else ms

    for scenario, r in results:
        m, t = r["marks"], r["timings"]
        first, last = m.get("first_request", 0.0), m.get("last_answer", 0.0)
        print(
            f"| {scenario} | {r['workers']} | {m.get('in_progress', 0.0):.1f} "
            f"| {first - m.get('in_progress', 0.0):.1f} | {last - first:.1f} | {r['seconds'] - last:.1f} "
            f"| {per_call(t, 'Store.lease_chunks', True)} | {per_call(t, 'Store.commit_part', True)} "
            f"| {per_call(t, 'BlobStore.put_durable')} | {per_call(t, 'Store.heartbeat')} "
            f"| {per_call(t, 'Store.active_workers')} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
