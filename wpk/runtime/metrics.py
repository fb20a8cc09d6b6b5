"""Per-tier metrics in Prometheus' text format, served over HTTP from the server's own loop.

Hand-written rather than prometheus_client: four metric families need ~100 lines, the `serve`
extra stays small for device-class hardware, and the /metrics endpoint runs on the asyncio
loop the gRPC server already has (prometheus_client's `start_http_server` adds a thread).

    wpk_requests_total{tier,model,code}        counter, one per finished ModelInfer
    wpk_request_seconds{tier,model}            histogram of ModelInfer latency
    wpk_slice_seconds{tier}                    histogram of the slice's own run time
    wpk_bytes_total{tier,direction}            counter of message bytes (tensor data of what
        we build, whole messages of what we receive); direction is in (from the caller), out
        (to the caller), forward (to the next tier), return (answers from the next tier)
    wpk_tier_restarts{tier}                    gauge: times a supervisor restarted this tier
        (wpk-deploy --local passes the count to the process it starts)
"""
from __future__ import annotations

import asyncio
import bisect
import threading
from collections import defaultdict

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    text = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels.items())
    return "{" + text + "}"


class Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class TierMetrics:
    """Counters of one tier server. Updated from the event loop and the tensor link's
    threads: each update takes a lock (uncontended: well under a microsecond)."""

    def __init__(self, tier: str):
        self.tier = tier
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.slice = Histogram()
        self.message_bytes: dict[str, int] = {"in": 0, "out": 0, "forward": 0, "return": 0}
        self.restarts = 0
        self.batches = 0          # batched slice runs (wpk-serve --max-batch)
        self.batch_rows = 0       # rows they ran
        self.lock = threading.Lock()

    def observe(self, model: str, code: str, seconds: float) -> None:
        with self.lock:
            self.requests[(model, code)] += 1
            self.latency[model].observe(seconds)

    def observe_slice(self, seconds: float) -> None:
        with self.lock:
            self.slice.observe(seconds)

    def observe_batch(self, rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows += rows

    def add_bytes(self, direction: str, count: int) -> None:
        with self.lock:
            self.message_bytes[direction] += count

    @staticmethod
    def _histogram(name: str, hist: Histogram, **labels: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip(BUCKETS + (float("inf"),), hist.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f"{name}_bucket{_labels(**labels, le=le)} {cumulative}")
        lines.append(f"{name}_sum{_labels(**labels)} {hist.total!r}")
        lines.append(f"{name}_count{_labels(**labels)} {hist.count}")
        return lines

    def render(self) -> str:
        with self.lock:
            return self._render()

    def _render(self) -> str:
        tier = self.tier
        lines = ["# HELP wpk_requests_total ModelInfer requests finished, by gRPC status code.",
                 "# TYPE wpk_requests_total counter"]
        for (model, code), value in sorted(self.requests.items()):
            lines.append(f"wpk_requests_total{_labels(tier=tier, model=model, code=code)} {value}")
        lines += ["# HELP wpk_request_seconds ModelInfer latency seen by this tier.",
                  "# TYPE wpk_request_seconds histogram"]
        for model, hist in sorted(self.latency.items()):
            lines += self._histogram("wpk_request_seconds", hist, tier=tier, model=model)
        lines += ["# HELP wpk_slice_seconds Time the slice itself ran (ONNX Runtime).",
                  "# TYPE wpk_slice_seconds histogram"]
        lines += self._histogram("wpk_slice_seconds", self.slice, tier=tier)
        lines += ["# HELP wpk_bytes_total Message bytes moved by this tier.",
                  "# TYPE wpk_bytes_total counter"]
        for direction, value in self.message_bytes.items():
            lines.append(f"wpk_bytes_total{_labels(tier=tier, direction=direction)} {value}")
        lines += ["# HELP wpk_tier_restarts Times a supervisor restarted this tier.",
                  "# TYPE wpk_tier_restarts gauge",
                  f"wpk_tier_restarts{_labels(tier=tier)} {self.restarts}",
                  "# HELP wpk_batches_total Batched slice runs (wpk-serve --max-batch).",
                  "# TYPE wpk_batches_total counter",
                  f"wpk_batches_total{_labels(tier=tier)} {self.batches}",
                  "# HELP wpk_batch_rows_total Requests' rows those runs computed.",
                  "# TYPE wpk_batch_rows_total counter",
                  f"wpk_batch_rows_total{_labels(tier=tier)} {self.batch_rows}"]
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: TierMetrics, host: str, port: int) -> asyncio.base_events.Server:
    """A minimal HTTP/1.0 server answering GET /metrics; returns the started asyncio server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = metrics.render().encode(), "200 OK"
                ctype = CONTENT_TYPE
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
