"""A small closed-loop HTTP load generator (aiohttp), plus process helpers.

    python -m bench.loadgen --url http://127.0.0.1:8200/v1/chat/completions \\
        --concurrency 16 --duration 5 [--stream] [--json]

``concurrency`` workers share one ``ClientSession`` whose connector is sized to
the concurrency (keep-alive).  Each worker sends POST ``body`` (or GET when the
body is empty) back to back.  A request counts as OK when the status is 2xx and
the whole body was read; with ``stream=True`` the body must also end with
``data: [DONE]`` (a Responses API stream: with its ``response.completed`` event).
Latency is time to the last byte.  ``requests`` in the result is the number of
OK requests, ``rps = requests / seconds``; failures are in ``errors`` and not in
the latency percentiles.

On a 2-core machine run the load generator in its own process
(:func:`run_load_in_subprocess`) so it
does not compete with the server's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class LoadResult:
    requests: int  # successful requests
    errors: int
    seconds: float
    rps: float  # successful requests per second
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float = 0.0  # time to response headers
    error_samples: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        return (
            f"requests={self.requests} errors={self.errors} seconds={self.seconds:.2f} "
            f"rps={self.rps:.0f} p50_ms={self.p50_ms:.2f} p99_ms={self.p99_ms:.2f} ttfb_p50_ms={self.ttfb_p50_ms:.2f}"
        )


def default_body(stream: bool = False, model: str = "gpt-4o-mini") -> bytes:
    body: dict = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))  # nearest rank
    return sorted_values[k]


async def run_load(
    url: str,
    body: bytes,
    headers: dict,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    stream: bool = False,
    warmup: float = 0.0,
) -> LoadResult:
    """Closed-loop load: stop after ``requests`` requests or ``duration`` seconds
    (whichever comes first; at least one must be given).  ``warmup`` seconds of
    load are run first and not counted."""
    if requests is None and duration is None:
        raise ValueError("give requests or duration")
    method = "POST" if body else "GET"
    hdrs = {"Content-Type": "application/json", **headers} if body else dict(headers)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
    latencies: list[float] = []
    ttfbs: list[float] = []
    errors = 0
    samples: list[str] = []
    budget = requests
    recording = False
    deadline = float("inf")
    done_marker = b"data: [DONE]\n\n"

    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
    ) as session:

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.request(method, url, data=body or None, headers=hdrs) as r:
                    t1 = time.perf_counter()
                    tail = last = b""
                    async for data in r.content.iter_any():
                        tail = (tail + data)[-len(done_marker):] if stream else b""
                        last = data
                    t2 = time.perf_counter()
                    # A Responses API stream ends with its response.completed event instead.
                    ok = 200 <= r.status < 300 and (not stream or tail == done_marker
                                                    or b"event: response.completed\n" in last)
                    if not recording:
                        return
                    if ok:
                        latencies.append(t2 - t0)
                        ttfbs.append(t1 - t0)
                    else:
                        errors += 1
                        if len(samples) < 5:
                            samples.append(f"status={r.status} tail={tail!r}")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if recording:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(repr(exc))

        async def worker() -> None:
            nonlocal budget
            while time.perf_counter() < deadline:
                if recording and budget is not None:
                    if budget <= 0:
                        return
                    budget -= 1
                await one()

        if warmup > 0:
            deadline = time.perf_counter() + warmup
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        recording = True
        start = time.perf_counter()
        deadline = start + duration if duration is not None else float("inf")
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start

    latencies.sort()
    ttfbs.sort()
    n = len(latencies)
    return LoadResult(
        requests=n,
        errors=errors,
        seconds=seconds,
        rps=n / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        ttfb_p50_ms=_percentile(ttfbs, 0.50) * 1000,
        error_samples=samples,
    )


# --------------------------------------------------------------------------- subprocess


def _subprocess_spec(url, body, headers, concurrency, requests, duration, stream, warmup) -> bytes:
    return json.dumps(
        {
            "url": url,
            "body_b64": base64.b64encode(body).decode(),
            "headers": headers,
            "concurrency": concurrency,
            "requests": requests,
            "duration": duration,
            "stream": stream,
            "warmup": warmup,
        }
    ).encode()


def _parse_result(stdout: bytes, stderr: bytes, rc: int | None) -> LoadResult:
    if rc != 0:
        raise RuntimeError(f"loadgen subprocess failed rc={rc}: {stderr.decode(errors='replace')[-2000:]}")
    return LoadResult(**json.loads(stdout.decode().strip().splitlines()[-1]))


def run_load_in_subprocess(
    url: str,
    body: bytes,
    headers: dict,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    stream: bool = False,
    warmup: float = 0.0,
    timeout: float | None = None,
) -> LoadResult:
    """:func:`run_load` in a fresh ``python -m bench.loadgen`` process (blocking).
    Do not call this from a running event loop that serves the target."""
    spec = _subprocess_spec(url, body, headers, concurrency, requests, duration, stream, warmup)
    p = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--spec-stdin"],
        input=spec,
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    return _parse_result(p.stdout, p.stderr, p.returncode)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited rc={proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def server_process(args: list[str], port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[subprocess.Popen]:
    """Run ``python <args>`` (e.g. ``["-m", "tests.mock_upstream", "--port", "8100", "--fast"]``)
    from the repo root, wait until ``port`` accepts connections, terminate on exit."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, host, timeout, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description="closed-loop HTTP load generator")
    p.add_argument("--url")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float)
    p.add_argument("--requests", type=int)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="SSE: read to [DONE] (default body asks stream+include_usage)")
    p.add_argument("--body", help="JSON body, or @file; default: a small chat completion request")
    p.add_argument("--header", action="append", default=[], metavar="K:V")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--spec-stdin", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.spec_stdin:
        spec = json.loads(sys.stdin.buffer.read())
        spec["body"] = base64.b64decode(spec.pop("body_b64"))
        result = asyncio.run(run_load(**spec))
        print(json.dumps(dataclasses.asdict(result)), flush=True)
        return

    if not args.url:
        p.error("--url is required")
    if args.duration is None and args.requests is None:
        args.duration = 5.0
    if args.body is None:
        body = default_body(args.stream)
    elif args.body.startswith("@"):
        with open(args.body[1:], "rb") as f:
            body = f.read()
    else:
        body = args.body.encode()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    result = asyncio.run(
        run_load(args.url, body, headers, args.concurrency, args.requests, args.duration, args.stream, args.warmup)
    )
    print(json.dumps(dataclasses.asdict(result)) if args.json else result.line(), flush=True)


if __name__ == "__main__":
    main()
