"""Load test (issue #7): many concurrent API clients while a batch runs. Loopback only.

    python bench/load.py [--clients 200] [--rounds 5] [--lines 20000]

Starts FakeUpstream (5 ms per request, so the batch stays in progress) and ``batchd serve``
with one API key, uploads an N-line batch file and starts the batch; then ``--clients``
asyncio clients (one aiohttp session each, Bearer key) each run ``--rounds`` rounds of: list
files, list batches, retrieve a file, retrieve the running batch, upload a small file,
download its content. Bounded in count (clients x rounds x 6 requests) and time (--deadline,
default 300 s). Prints the request count, errors (must be 0; exit status 1 otherwise) and
p50/p95/p99 latency per operation. ``run_load`` is also used by tests/integration/test_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
SMALL = b"".join(
    json.dumps(
        {"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    ).encode()
    + b"\n"
    for i in range(5)
)


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())


async def _timed(tally: Tally, op: str, call: Any) -> Any:
    t0 = time.perf_counter()
    try:
        async with call as resp:
            body = await resp.read()
            if resp.status >= 400:
                tally.errors.append(f"{op}: {resp.status} {body[:200]!r}")
            result = json.loads(body) if resp.content_type == "application/json" else body
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.errors.append(f"{op}: {type(exc).__name__} {exc}")
        result = None
    tally.latencies[op].append(time.perf_counter() - t0)
    return result


async def _client(base: str, key: str, rounds: int, file_id: str, batch_id: str, tally: Tally) -> None:
    headers = {"authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url=base + "/", headers=headers, timeout=timeout) as s:
        for _ in range(rounds):
            await _timed(tally, "list_files", s.get("files", params={"limit": "20"}))
            await _timed(tally, "list_batches", s.get("batches"))
            await _timed(tally, "retrieve_file", s.get(f"files/{file_id}"))
            await _timed(tally, "retrieve_batch", s.get(f"batches/{batch_id}"))
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", SMALL, filename="small.jsonl", content_type="application/jsonl")
            up = await _timed(tally, "upload", s.post("files", data=form))
            if isinstance(up, dict) and "id" in up:
                await _timed(tally, "content", s.get(f"files/{up['id']}/content"))


async def run_load(
    base_url: str, key: str, *, clients: int, rounds: int, file_id: str, batch_id: str, deadline: float
) -> Tally:
    """``clients`` concurrent clients, ``rounds`` rounds each, all within ``deadline`` seconds."""
    tally = Tally()
    tasks = [_client(base_url, key, rounds, file_id, batch_id, tally) for _ in range(clients)]
    await asyncio.wait_for(asyncio.gather(*tasks), deadline)
    return tally


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(tally: Tally, elapsed: float) -> str:
    rows = [
        f"requests {tally.requests}, errors {len(tally.errors)}, {elapsed:.1f} s, "
        f"{tally.requests / elapsed:.0f} req/s"
    ]
    rows.append(f"{'operation':<16}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for op, xs in tally.latencies.items():
        p = [percentile(xs, q) * 1000 for q in (50, 95, 99)]
        rows.append(f"{op:<16}{len(xs):>6}{p[0]:>9.1f}{p[1]:>9.1f}{p[2]:>9.1f}")
    return "\n".join(rows + tally.errors[:10])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--deadline", type=float, default=300)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import openai

    from batchd.testing import FakeUpstream
    from tests.integration.test_tenancy import new_key_in_process, wait_auth_on
    from tests.support import Server

    with tempfile.TemporaryDirectory() as tmp, FakeUpstream.start_in_thread(seed=1, latency=0.005) as up:
        server = Server(Path(tmp) / "data", up.base_url).start()
        try:
            key = new_key_in_process(server, "load")
            wait_auth_on(server)
            c = openai.OpenAI(base_url=server.base_url, api_key=key)
            lines = [
                {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]}}
                for i in range(args.lines)
            ]  # fmt: skip
            data = "".join(json.dumps(x) + "\n" for x in lines).encode()
            f = c.files.create(file=("load.jsonl", data), purpose="batch")
            b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            t0 = time.perf_counter()
            tally = asyncio.run(
                run_load(server.base_url, key, clients=args.clients, rounds=args.rounds,
                         file_id=f.id, batch_id=b.id, deadline=args.deadline)
            )  # fmt: skip
            elapsed = time.perf_counter() - t0
            status = c.batches.retrieve(b.id)
            done = status.request_counts.completed if status.request_counts else 0
            print(f"clients {args.clients} x rounds {args.rounds}; batch {status.status}, "
                  f"{done}/{args.lines} lines done when the load ended")  # fmt: skip
            print(report(tally, elapsed))
        finally:
            server.stop()
    return 1 if tally.errors else 0


if __name__ == "__main__":
    sys.exit(main())
