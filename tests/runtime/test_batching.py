"""Dynamic batching at a tier (`wpk-serve --max-batch`): requests that arrive together run as
one batch, each caller gets its own rows back, a request whose deadline passes in the queue
leaves it without running, and a slice that cannot run batched is refused on start."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.errors import WpkError
from wpk.runtime.batching import Batcher, BatchPolicy, batchable, check_batched

from .conftest import Pipeline, reference
from .test_pipeline import model_feeds, triton_infer


class Expired(Exception):
    pass


def _doubling_batcher(policy: BatchPolicy, runs: list[int], delay_s: float = 0.0):
    """A Batcher whose slice doubles its input (and records each batch's rows)."""
    async def run_batch(feeds):
        runs.append(feeds["x"].shape[0])
        await asyncio.sleep(delay_s)
        return {"y": feeds["x"] * 2}
    return Batcher(run_batch, policy, Expired)


def test_requests_arriving_together_run_as_one_batch_and_get_their_own_rows():
    runs: list[int] = []

    async def main():
        batcher = _doubling_batcher(BatchPolicy(max_batch=8, max_queue_delay_s=0.5), runs)
        inputs = [np.full((1, 3), i, np.float32) for i in range(8)]
        started = time.monotonic()
        outs = await asyncio.gather(*(batcher.run({"x": x}) for x in inputs))
        # eight rows fill the batch: it runs at once, without waiting out the delay
        assert time.monotonic() - started < 0.4
        for x, out in zip(inputs, outs):
            np.testing.assert_array_equal(out["y"], x * 2)
        await batcher.stop()
    asyncio.run(main())
    assert runs == [8]


def test_batches_hold_at_most_max_batch_rows_and_group_by_shape():
    runs: list[int] = []

    async def main():
        batcher = _doubling_batcher(BatchPolicy(max_batch=4, max_queue_delay_s=0.05), runs)
        small = [batcher.run({"x": np.full((1, 3), i, np.float32)}) for i in range(6)]
        wide = [batcher.run({"x": np.full((1, 5), i, np.float32)}) for i in range(2)]
        outs = await asyncio.gather(*small, *wide)
        assert [o["y"].shape for o in outs] == [(1, 3)] * 6 + [(1, 5)] * 2
        assert [float(o["y"][0, 0]) for o in outs] == [0, 2, 4, 6, 8, 10, 0, 2]
        await batcher.stop()
    asyncio.run(main())
    assert sorted(runs) == [2, 2, 4]


def test_a_request_whose_deadline_passes_in_the_queue_leaves_without_running():
    runs: list[int] = []

    async def main():
        batcher = _doubling_batcher(BatchPolicy(max_batch=8, max_queue_delay_s=0.3), runs)
        late = asyncio.ensure_future(batcher.run({"x": np.ones((1, 3), np.float32)},
                                                 deadline=time.monotonic() + 0.05))
        patient = asyncio.ensure_future(batcher.run({"x": np.ones((1, 3), np.float32)}))
        with pytest.raises(Expired):
            await late
        assert (await patient)["y"].tolist() == [[2.0, 2.0, 2.0]]
        await batcher.stop()
    asyncio.run(main())
    assert runs == [1]      # the expired request never ran


def test_a_failed_batch_fails_each_of_its_requests():
    async def main():
        async def broken(feeds):
            raise RuntimeError("slice failed")
        batcher = Batcher(broken, BatchPolicy(4, 0.01), Expired)
        results = await asyncio.gather(*(batcher.run({"x": np.ones((1, 2), np.float32)})
                                         for _ in range(3)), return_exceptions=True)
        assert [str(r) for r in results] == ["slice failed"] * 3
        await batcher.stop()
    asyncio.run(main())


def _fixed_batch_model() -> onnx.ModelProto:
    """x [1, 8] -> Reshape to [1, 8] (the batch size written into the graph) -> MatMul."""
    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_a_slice_that_fixes_its_batch_size_is_refused_in_one_line():
    model = _fixed_batch_model()
    single = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batched = ort.InferenceSession(batchable(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rows = [{"x": np.random.default_rng(i).random((1, 8), dtype=np.float32)} for i in range(2)]
    with pytest.raises(WpkError) as info:
        check_batched(lambda f: batched.run(None, f), lambda f: single.run(None, f), rows,
                      "tier 'edge'")
    message = str(info.value)
    assert "\n" not in message and "tier 'edge'" in message and "--max-batch" in message


def _all_at_once(count: int, call) -> dict[int, object]:
    """call(0) .. call(count - 1), each from its own thread, all started together: the
    answers by index (a caller that failed or hung has none)."""
    results: dict[int, object] = {}

    def run(index: int) -> None:
        results[index] = call(index)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_tier_batches_concurrent_callers_over_grpc(plans):
    """The resnet plan's edge tier with --max-batch 8: twelve callers at once each get what
    the edge slice computes on their own input, in fewer slice runs than requests."""
    plan_dir = plans["resnet"]
    pipeline = Pipeline(plan_dir, batching={"edge": BatchPolicy(8, 0.2)})
    try:
        edge = pipeline.plan.tiers[1]
        service = pipeline.services["edge"]
        session = ort.InferenceSession(str(plan_dir / edge.slice),
                                       providers=["CPUExecutionProvider"])
        tensors = pipeline.plan.tensors
        feeds = [{name: np.random.default_rng(seed).standard_normal(
            tensors[name].shape).astype(tensors[name].dtype) for name in edge.inputs}
            for seed in range(12)]
        results = _all_at_once(12, lambda i: triton_infer(
            pipeline.address["edge"], f"{pipeline.plan.name}.edge", feeds[i]))
        assert sorted(results) == list(range(12))
        for index, feed in enumerate(feeds):
            slice_feeds = {n: feed[n] for n in edge.slice_inputs}
            for name, want in zip(edge.slice_outputs, session.run(edge.slice_outputs,
                                                                  slice_feeds)):
                np.testing.assert_allclose(results[index].as_numpy(name), want, rtol=1e-4,
                                           atol=1e-5)
        assert service.metrics.batch_rows == 12
        assert service.metrics.batches < 12
        assert "wpk_batches_total" in service.metrics.render()
        # a deadline shorter than the queue delay: DEADLINE_EXCEEDED, and nothing ran
        from tritonclient.utils import InferenceServerException

        before = service.metrics.batch_rows
        with pytest.raises(InferenceServerException) as info:
            triton_infer(pipeline.address["edge"], f"{pipeline.plan.name}.edge", feeds[0],
                         client_timeout=0.05)
        assert "Deadline" in str(info.value) or "DEADLINE" in str(info.value.status())
        time.sleep(0.3)
        assert service.metrics.batch_rows == before
    finally:
        pipeline.close()


def test_a_tier_batches_what_the_tier_before_sends_over_one_tensor_link(plans):
    """The edge tier batches requests that reach it from the device tier, all over one
    tensor-link connection: twelve callers of the whole pipeline each get the whole model's
    answer on their own input, in fewer edge runs than requests."""
    plan_dir = plans["resnet"]
    pipeline = Pipeline(plan_dir, batching={"edge": BatchPolicy(8, 0.2)})
    try:
        edge = pipeline.services["edge"]
        feeds = [model_feeds(plan_dir, seed) for seed in range(12)]
        results = _all_at_once(12, lambda i: triton_infer(pipeline.entry, pipeline.plan.name,
                                                          feeds[i]))
        assert sorted(results) == list(range(12))
        for index, feed in enumerate(feeds):
            for name, want in reference(plan_dir, feed).items():
                np.testing.assert_allclose(results[index].as_numpy(name), want, rtol=1e-4,
                                           atol=1e-5)
        assert edge.metrics.batch_rows == 12
        assert edge.metrics.batches < 12
    finally:
        pipeline.close()


def test_serve_and_deploy_take_the_same_batching_flags(plans):
    """One definition of --max-batch / --max-queue-delay-us: the same checks, defaults and
    policy on wpk-serve and wpk-deploy."""
    from wpk.deploy.cli import build_parser as deploy_parser
    from wpk.runtime.batching import batch_policy_from_args
    from wpk.runtime.server import build_parser as serve_parser

    serve_args = serve_parser().parse_args([str(plans["mlp"]), "--tier", "cloud",
                                            "--max-batch", "4", "--max-queue-delay-us", "250"])
    deploy_args = deploy_parser().parse_args([str(plans["mlp"]), "--local", "--max-batch", "4",
                                              "--max-queue-delay-us", "250"])
    assert batch_policy_from_args(serve_args) == batch_policy_from_args(deploy_args) == \
        BatchPolicy(4, 0.00025)
    for parser, batch in ((serve_parser(), 1), (deploy_parser(), None)):   # None: the plan's
        assert (parser.get_default("max_batch"), parser.get_default("max_queue_delay_us")) == \
            (batch, 1000)
    with pytest.raises(SystemExit):
        deploy_parser().parse_args([str(plans["mlp"]), "--local", "--max-batch", "5000"])
