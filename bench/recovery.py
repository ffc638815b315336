"""Recovery after kill -9 (issue #4): time from restart to the first resumed request, and the
upstream calls each kill repeats.

    python bench/recovery.py [--lines 20000] [--kills 5] [--latency 0.02] [--concurrency 48]

Runs ``batchd serve`` as a subprocess against an in-process FakeUpstream with latency, SIGKILLs
the server at evenly spread points of the run and restarts it on the same data directory. For
each kill it prints: the requests FakeUpstream had in flight just before the kill, the time from
spawning the new process to /health, the time to the first upstream request of the new process,
and the bodies sent again (``repeated_bodies`` grows only when a body already answered 200 is
sent again). At the end it checks every custom_id came back exactly once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BenchError, Proc, free_port, http_ok, wait_until, write_input  # noqa: E402

from batchd.testing import FakeUpstream  # noqa: E402


def start_server(work: Path, upstream: str, port: int, concurrency: int) -> Proc:
    env = {
        **os.environ,
        "BATCHD_PORT": str(port),
        "BATCHD_DATA_DIR": str(work / "data"),
        "BATCHD_UPSTREAM_URL": upstream,
        "BATCHD_UPSTREAM_CONCURRENCY": str(concurrency),
        "BATCHD_CHUNK_LINES": "500",
    }
    argv = [sys.executable, "-m", "batchd", "serve", "--log-level", "warning"]
    return Proc("batchd", argv, env, work / "server.log")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--concurrency", type=int, default=48)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="batchd-recovery-"))
    ids, _ = write_input(work / "input.jsonl", args.lines)
    rows = []
    with FakeUpstream.start_in_thread(latency=args.latency) as fake:
        port = free_port()
        health = f"http://127.0.0.1:{port}/health"
        server = start_server(work, fake.base_url, port, args.concurrency)
        try:
            wait_until(lambda: http_ok(health), 30, "batchd /health")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench")
            f = client.files.create(file=(work / "input.jsonl").open("rb"), purpose="batch")
            batch = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            for k in range(1, args.kills + 1):
                target = args.lines * k // (args.kills + 1)
                wait_until(
                    lambda t=target: client.batches.retrieve(batch.id).request_counts.completed >= t,
                    300,
                    f"{target} lines",
                )
                before = fake.stats()
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                server.stop()
                spawned = time.monotonic()
                server = start_server(work, fake.base_url, port, args.concurrency)
                wait_until(lambda: http_ok(health), 30, "batchd /health")
                healthy = time.monotonic() - spawned
                sent = fake.stats()["requests"]
                wait_until(lambda s=sent: fake.stats()["requests"] > s, 60, "the first resumed request")
                first = time.monotonic() - spawned
                rows.append([k, target, before["in_flight"], healthy, first, before["repeated_bodies"]])
            done = wait_until(
                lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
                600,
                "the batch to end",
            )
            final = fake.stats()
            out = client.files.content(done.output_file_id).content if done.output_file_id else b""
            err = client.files.content(done.error_file_id).content if done.error_file_id else b""
        finally:
            server.stop()
    seen: dict[str, int] = {}
    for line in (out + err).splitlines():
        cid = orjson.loads(line)["custom_id"]
        seen[cid] = seen.get(cid, 0) + 1
    if done.status != "completed" or set(seen) != set(ids) or max(seen.values()) != 1:
        raise BenchError(
            f"wrong result: status {done.status}, {len(seen)} ids, max count {max(seen.values())}"
        )

    repeats = [row[5] for row in rows[1:]] + [final["repeated_bodies"]]
    print(
        f"\n{args.lines} lines, latency {args.latency}s, concurrency {args.concurrency}, {args.kills} kills"
    )
    print(
        "| kill | at line | in flight at kill | restart → /health (s) "
        "| restart → first request (s) | repeated calls |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row, total in zip(rows, repeats, strict=True):
        k, target, inflight, healthy, first, before = row
        print(f"| {k} | {target} | {inflight} | {healthy:.2f} | {first:.2f} | {total - before} |")
    print(
        f"\ntotal requests {final['requests']} for {args.lines} lines; repeated {final['repeated_bodies']};"
        " every custom_id exactly once: yes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
