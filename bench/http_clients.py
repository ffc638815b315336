"""Which HTTP client should batchd use for upstream requests? (issue #3: "choose the HTTP
client by measurement")

    python bench/http_clients.py [--requests 20000] [--concurrency 64] [--rounds 2]

Starts ``batchd fake-upstream`` (zero latency) in its own process, then runs the same bare
loop (uvloop, a semaphore of ``concurrency``, POST a small chat body, read the answer and its
``x-request-id``) with aiohttp and with pyreqwest, alternating, each in a fresh process.
Prints requests/s and CPU per request (all threads of the client process) and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Proc, free_port, http_ok, wait_until  # noqa: E402

BODY = b'{"model":"fake","messages":[{"role":"user","content":"Hello there"}],"max_tokens":50}'


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _aiohttp(url: str, n: int, concurrency: int) -> None:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, headers={"Content-Type": "application/json"}, skip_auto_headers=("User-Agent",)
    ) as session:

        async def one() -> None:
            async with sem, session.post(url, data=BODY, timeout=aiohttp.ClientTimeout(total=60)) as r:
                await r.read()
                assert r.status == 200 and r.headers.get("x-request-id")

        await asyncio.gather(*(one() for _ in range(n)))


async def _pyreqwest(url: str, n: int, concurrency: int) -> None:
    from datetime import timedelta

    from pyreqwest.client import ClientBuilder

    sem = asyncio.Semaphore(concurrency)
    timeout = timedelta(seconds=60)
    builder = ClientBuilder().max_connections(concurrency).no_proxy()
    async with builder.default_headers({"Content-Type": "application/json"}).build() as client:

        async def one() -> None:
            async with sem:
                r = await client.post(url).body_bytes(BODY).timeout(timeout).build().send()
                await r.bytes()
                assert r.status == 200 and r.headers.get("x-request-id")

        await asyncio.gather(*(one() for _ in range(n)))


def client_main(which: str, url: str, n: int, concurrency: int) -> None:
    import uvloop

    loop = {"aiohttp": _aiohttp, "pyreqwest": _pyreqwest}[which]
    cpu0, t0 = _cpu(), time.monotonic()
    uvloop.run(loop(url, n, concurrency))
    wall = time.monotonic() - t0
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": _cpu() - cpu0}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--client", choices=["aiohttp", "pyreqwest"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        client_main(args.client, args.url, args.requests, args.concurrency)
        return 0

    port = free_port()
    log = Path(f"/tmp/batchd-http-clients-fake-{port}.log")
    argv = [sys.executable, "-m", "batchd", "fake-upstream", "--port", str(port)]
    fake = Proc("fake", argv, dict(os.environ), log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(base + "/v1/models"), 30, "fake upstream")
        results: dict[str, list[dict[str, float]]] = {"aiohttp": [], "pyreqwest": []}
        for _ in range(args.rounds):
            for which in results:
                out = subprocess.run(
                    [sys.executable, __file__, "--client", which, "--url", base + "/v1/chat/completions",
                     "--requests", str(args.requests), "--concurrency", str(args.concurrency)],
                    capture_output=True, text=True, check=True,
                )
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
                results[which].append(json.loads(line[len("RESULT "):]))
    finally:
        fake.stop()
    n = args.requests
    print(f"\n{n:,} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| client | requests/s (best) | CPU µs/request (best) |")
    print("|---|---:|---:|")
    best = {}
    for which, runs in results.items():
        rate = max(n / r["wall_s"] for r in runs)
        cpu = min(r["cpu_s"] / n * 1e6 for r in runs)
        best[which] = (rate, cpu)
        print(f"| {which} | {rate:,.0f} | {cpu:,.0f} |")
    (ra, ca), (rp, cp) = best["aiohttp"], best["pyreqwest"]
    print(f"\npyreqwest / aiohttp: {rp / ra:.2f}x the requests/s, {cp / ca:.2f}x the CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
