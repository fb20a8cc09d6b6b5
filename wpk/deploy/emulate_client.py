"""The measuring side of `wpk-emulate`, run inside a tier's namespace (hence a separate
process): time inference requests, or read a tier's request-time counters.

    python -m wpk.deploy.emulate_client infer --target 127.0.0.1:8001 --plan DIR \
        --model resnet_like --requests 10 --warmup 2 [--tls-dir D --as device --peer device]
    python -m wpk.deploy.emulate_client scrape --url http://127.0.0.1:9090/metrics

`infer` sends random inputs shaped like the model's (or the tier-local model's) inputs and
prints {"ms": [...]}; `scrape` prints {"sum_s": {model: s}, "count": {model: n}} from the
tier's `wpk_request_seconds` histogram.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request

import numpy as np

from wpk.errors import WpkError, cli_entry
from wpk.plan import load_plan

_SAMPLE = re.compile(r'^wpk_request_seconds_(sum|count)\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$')


def random_inputs(plan_dir: str, model: str) -> dict[str, np.ndarray]:
    """Random arrays for the entry model (the plan's name) or a tier-local model (name.tier)."""
    plan = load_plan(plan_dir)
    if model == plan.name:
        specs = plan.model.inputs
    else:
        tier = plan.tier(model.rsplit(".", 1)[-1])
        specs = [plan.tensors[name] for name in tier.inputs]
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in specs:
        shape = [d if d > 0 else 1 for d in spec.shape]
        dtype = spec.numpy_dtype
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return arrays


async def time_requests(target: str, model: str, arrays: dict[str, np.ndarray], requests: int,
                        warmup: int, tls_dir: str | None = None, as_tier: str | None = None,
                        peer: str | None = None) -> list[float]:
    import grpc

    from wpk.runtime import protocol as pb
    from wpk.runtime.client import channel_options
    from wpk.runtime.infer_messages import build_request

    options = channel_options()
    if tls_dir:
        from wpk.deploy import tls

        creds = tls.load(tls_dir, as_tier)
        channel = grpc.aio.secure_channel(target, tls.channel_credentials(creds),
                                          options + tls.target_name_options(peer))
    else:
        channel = grpc.aio.insecure_channel(target, options=options)
    request = build_request(model, arrays)
    times = []
    async with channel:
        stub = pb.Stub(channel)
        for i in range(warmup + requests):
            start = time.perf_counter()
            await stub.ModelInfer(request, timeout=300)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def scrape(url: str) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            kind, model, value = match.groups()
            (sums if kind == "sum" else counts)[model] = float(value)
    return {"sum_s": sums, "count": counts}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpk.deploy.emulate_client")
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer")
    infer.add_argument("--target", required=True)
    infer.add_argument("--plan", required=True)
    infer.add_argument("--model", required=True)
    infer.add_argument("--requests", type=int, default=10)
    infer.add_argument("--warmup", type=int, default=2)
    infer.add_argument("--tls-dir")
    infer.add_argument("--as", dest="as_tier")
    infer.add_argument("--peer")
    metrics = sub.add_parser("scrape")
    metrics.add_argument("--url", required=True)
    args = parser.parse_args(argv)
    if args.command == "scrape":
        print(json.dumps(scrape(args.url)))
        return 0
    arrays = random_inputs(args.plan, args.model)
    try:
        times = asyncio.run(time_requests(args.target, args.model, arrays, args.requests,
                                          args.warmup, args.tls_dir, args.as_tier, args.peer))
    except Exception as error:  # grpc.aio.AioRpcError and friends: one line for the parent
        details = error.details() if hasattr(error, "details") else str(error)
        raise WpkError(f"requests to {args.target} ({args.model}) failed: {details}") from None
    print(json.dumps({"ms": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
