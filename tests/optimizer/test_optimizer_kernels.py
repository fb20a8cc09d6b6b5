"""Every generated kernel matches ONNX Runtime on random shapes and random valid schedules."""
import numpy as np
import pytest

from wpk.optimizer import codegen_c, ops
from wpk.optimizer.build import CKernel

RNG = np.random.default_rng(42)


def _run(compute, config, arrays):
    schedule = ops.make_schedule(compute, config)
    kernel = CKernel(codegen_c.lower_c(compute, schedule), compute.name, len(arrays))
    kernel(*arrays)
    return arrays[-1]


def _schedules(compute, count):
    """The default schedule plus `count - 1` random valid ones."""
    space = ops.schedule_space(compute)
    configs = [ops.default_schedule_config(compute)]
    while len(configs) < count:
        configs.append(space.sample(RNG))
    return configs


CONV_CASES = [
    # n, c, h, w, m, kh, kw, stride, pads (t, l, b, r), dilations, group
    (1, 3, 13, 11, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (1, 6, 15, 9, 9, 3, 3, (2, 2), (1, 0, 2, 1), (1, 1), 3),       # grouped, asym pads
    (1, 7, 12, 17, 7, 3, 3, (2, 1), (1, 1, 1, 1), (1, 1), 7),      # depthwise, odd stride
    (2, 4, 9, 10, 6, 5, 3, (1, 2), (2, 1, 2, 1), (2, 1), 2),       # batch 2, dilation
    (1, 16, 7, 7, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),      # pointwise
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_matches_onnxruntime(case, relu, single_node_session):
    n, c, h, w, m, kh, kw, stride, pads, dil, group = case
    compute = ops.conv2d(n, c, h, w, m, kh, kw, stride, pads, dil, group, bias=True, relu=relu)
    x = RNG.standard_normal((n, c, h, w)).astype(np.float32)
    wt = RNG.standard_normal((m, c // group, kh, kw)).astype(np.float32)
    b = RNG.standard_normal(m).astype(np.float32)
    session = single_node_session("Conv", x.shape, {"W": wt, "B": b}, ["X", "W", "B"],
                                  strides=list(stride), pads=list(pads), dilations=list(dil),
                                  group=group)
    expected = session.run(None, {"X": x})[0]
    if relu:
        expected = np.maximum(expected, 0)
    for config in _schedules(compute, 2):
        out = _run(compute, config, [x, wt, b, np.empty(compute.output.shape, np.float32)])
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=str(config))


@pytest.mark.parametrize("m,n,k,ta,tb,bias", [(1, 37, 29, False, True, "row"),
                                              (5, 16, 33, True, False, "full"),
                                              (3, 7, 64, False, False, None)])
def test_gemm_matches_onnxruntime(m, n, k, ta, tb, bias, single_node_session):
    compute = ops.gemm(m, n, k, ta, tb, alpha=0.5, beta=2.0, bias=bias)
    a = RNG.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    bm = RNG.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    weights, inputs, arrays = {"Bm": bm}, ["X", "Bm"], [a, bm]
    if bias:
        c = RNG.standard_normal((n,) if bias == "row" else (m, n)).astype(np.float32)
        weights["C"], arrays = c, arrays + [c]
        inputs.append("C")
    session = single_node_session("Gemm", a.shape, weights, inputs, transA=int(ta),
                                  transB=int(tb), alpha=0.5, beta=2.0)
    expected = session.run(None, {"X": a})[0]
    for config in _schedules(compute, 2):
        out = _run(compute, config, arrays + [np.empty((m, n), np.float32)])
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=str(config))


@pytest.mark.parametrize("kind,include_pad", [("max", False), ("avg", False), ("avg", True)])
def test_pool_matches_onnxruntime(kind, include_pad, single_node_session):
    n, c, h, w, k, stride, pads = 1, 5, 11, 8, 3, (2, 2), (1, 1, 1, 0)
    compute = ops.pool2d(kind, n, c, h, w, k, k, stride, pads, include_pad)
    x = RNG.standard_normal((n, c, h, w)).astype(np.float32)
    attrs = dict(kernel_shape=[k, k], strides=list(stride), pads=list(pads))
    if kind == "avg":
        attrs["count_include_pad"] = int(include_pad)
    session = single_node_session("MaxPool" if kind == "max" else "AveragePool", x.shape, {},
                                  ["X"], **attrs)
    expected = session.run(None, {"X": x})[0]
    for config in _schedules(compute, 2):
        out = _run(compute, config, [x, np.empty(compute.output.shape, np.float32)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=str(config))


def test_global_average_pool_matches_onnxruntime(single_node_session):
    compute = ops.global_avg_pool(2, 6, 7, 9)
    x = RNG.standard_normal((2, 6, 7, 9)).astype(np.float32)
    expected = single_node_session("GlobalAveragePool", x.shape, {}, ["X"]).run(None, {"X": x})[0]
    out = _run(compute, ops.default_schedule_config(compute),
               [x, np.empty(compute.output.shape, np.float32)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_invalid_schedules_are_filtered():
    from wpk.optimizer.dsl import Schedule, ScheduleError

    compute = ops.gemm(4, 4, 4)
    schedule = Schedule(compute)
    schedule.reorder("k", "i", "j")
    schedule.parallel("k", 2)
    with pytest.raises(ScheduleError, match="race"):
        schedule.validate()
    space = ops.schedule_space(compute)
    assert all(space.valid(c) for c in space)
    assert sum(1 for _ in space) > 10


@pytest.mark.parametrize("compute", [
    ops.conv2d(1, 6, 15, 9, 9, 3, 3, (2, 2), (1, 0, 2, 1), (1, 1), 3, relu=True),
    ops.gemm(5, 16, 33, True, False, bias="full"),
    ops.pool2d("max", 1, 5, 11, 8, 3, 3, (2, 2), (1, 1, 1, 0)),
], ids=["conv", "gemm", "maxpool"])
def test_register_tiled_schedules_match_the_default(compute):
    """The tiled order lowers to a local accumulator tile (register blocking), including
    partial tiles at the edges; every variant must agree with the default schedule."""
    from wpk.optimizer.codegen_c import _register_tile

    arrays = ops.random_buffers(compute, RNG)
    expected = _run(compute, ops.default_schedule_config(compute),
                    [a.copy() for a in arrays])
    tiled = 0
    for tile_c, tile_x, vec in [(2, 4, True), (4, 1, "spatial"), (1, 8, False), (4, 4, True)]:
        config = {"order": "tiled", "tile_c": tile_c, "tile_x": tile_x, "vectorize": vec,
                  "unroll": 2, "threads": 2}
        if not ops.schedule_space(compute).valid(config):
            continue
        tiled += _register_tile(ops.make_schedule(compute, config).loops) is not None
        out = _run(compute, config, [a.copy() for a in arrays])
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=str(config))
    assert tiled >= 1
