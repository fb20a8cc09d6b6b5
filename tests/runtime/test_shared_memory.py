"""Triton's system shared-memory extension on wpk tiers, driven by tritonclient.grpc +
tritonclient.utils.shared_memory."""
from __future__ import annotations

import asyncio
import itertools
import os

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm

from .conftest import Pipeline, reference
from .test_pipeline import expect_error, model_feeds
from wpk.plan import load_plan
from wpk.runtime import protocol as pb
from wpk.runtime.client import InferenceClient
from wpk.runtime.status import TierError

_names = itertools.count()
OUTPUT = "gemm_77_out"  # resnet_like's logits


@pytest.fixture
def region():
    """A POSIX shared-memory object made by tritonclient: region(byte_size) -> (name, key,
    handle); destroyed afterwards."""
    made = []

    def make(byte_size: int):
        n = next(_names)
        name, key = f"test_region_{n}", f"/wpk_test_{os.getpid()}_{n}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return name, key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture
def triton_client(resnet_pipeline):
    client = triton.InferenceServerClient(resnet_pipeline.entry)
    yield client
    client.unregister_system_shared_memory()  # every region: tests leave nothing behind
    assert not client.get_system_shared_memory_status().regions


def shm_input(name: str, array: np.ndarray, region: str, offset: int = 0,
              byte_size: int | None = None):
    tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
    tensor.set_shared_memory(region, array.nbytes if byte_size is None else byte_size, offset)
    return tensor


def test_input_in_shared_memory_matches_whole_model(plans, triton_client, region):
    feeds = model_feeds(plans["resnet"])
    image = feeds["image"]
    name, key, handle = region(image.nbytes)
    shm.set_shared_memory_region(handle, [image])
    triton_client.register_system_shared_memory(name, key, image.nbytes)
    assert "system_shared_memory" in triton_client.get_server_metadata().extensions
    status = triton_client.get_system_shared_memory_status(name).regions[name]
    assert (status.name, status.key, status.offset, status.byte_size) == \
        (name, key, 0, image.nbytes)
    result = triton_client.infer("resnet_like", [shm_input("image", image, name)])
    expected = reference(plans["resnet"], feeds)
    for output, want in expected.items():
        np.testing.assert_allclose(result.as_numpy(output), want, rtol=1e-5, atol=1e-6)
    # the server reads the region at request time: new contents, new answer
    shm.set_shared_memory_region(handle, [-image])
    again = triton_client.infer("resnet_like", [shm_input("image", image, name)])
    want = reference(plans["resnet"], {"image": -image})
    np.testing.assert_allclose(again.as_numpy(OUTPUT), want[OUTPUT], rtol=1e-5, atol=1e-6)


def test_outputs_in_shared_memory_mixed_with_raw_ones(plans, region):
    """dag: outputs from every tier; the first goes to shared memory (no bytes back), the
    others come back raw and tritonclient still finds them by position."""
    pipeline = Pipeline(plans["dag"])
    client = triton.InferenceServerClient(pipeline.entry)
    try:
        feeds = model_feeds(plans["dag"])
        expected = reference(plans["dag"], feeds)
        names = list(expected)
        assert len(names) >= 2
        first = expected[names[0]]
        out_name, out_key, out_handle = region(first.nbytes + 256)
        client.register_system_shared_memory(out_name, out_key, first.nbytes + 256)
        inputs = []
        for input_name, array in feeds.items():
            tensor = triton.InferInput(input_name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(n) for n in names]
        outputs[0].set_shared_memory(out_name, first.nbytes + 200, offset=32)
        result = client.infer(pipeline.plan.name, inputs, outputs=outputs)
        response = result.get_response()
        assert len(response.raw_output_contents) == len(names)
        assert response.raw_output_contents[0] == b""
        meta = result.get_output(names[0])
        assert meta.parameters["shared_memory_region"].string_param == out_name
        got = shm.get_contents_as_numpy(out_handle, np.float32, list(meta.shape), offset=32)
        np.testing.assert_allclose(got, first, rtol=1e-5, atol=1e-6)
        for name in names[1:]:
            np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-5,
                                       atol=1e-6)
    finally:
        client.close()
        pipeline.close()


def test_input_and_output_in_one_object_at_offsets(plans, triton_client, region):
    """Both in shared memory, in one object registered as two regions at offsets."""
    feeds = model_feeds(plans["resnet"], seed=1)
    image = feeds["image"]
    logits = reference(plans["resnet"], feeds)[OUTPUT]
    _, key, handle = region(4096 + image.nbytes + 4096)
    shm.set_shared_memory_region(handle, [image], offset=4096)
    triton_client.register_system_shared_memory("in", key, image.nbytes, offset=4096)
    triton_client.register_system_shared_memory("out", key, 4096, offset=4096 + image.nbytes)
    output = triton.InferRequestedOutput(OUTPUT)
    output.set_shared_memory("out", logits.nbytes)
    result = triton_client.infer("resnet_like", [shm_input("image", image, "in")],
                                 outputs=[output])
    assert not result.get_response().raw_output_contents  # nothing came back raw
    got = shm.get_contents_as_numpy(handle, np.float32, logits.shape,
                                    offset=4096 + image.nbytes)
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)


def test_a_tier_slice_model_reads_shared_memory(plans, resnet_pipeline, region):
    """Not only the entry tier: the cloud tier's slice, inputs in shared memory, answers as
    it does with the bytes in the message."""
    plan = load_plan(plans["resnet"])
    cloud = plan.tiers[-1]
    client = triton.InferenceServerClient(resnet_pipeline.address[cloud.name])
    rng = np.random.default_rng(3)
    arrays = {n: rng.standard_normal([d if d > 0 else 1 for d in plan.tensors[n].shape])
              .astype(np.float32) for n in cloud.inputs}
    total = sum(a.nbytes for a in arrays.values())
    name, key, handle = region(total)
    shm.set_shared_memory_region(handle, list(arrays.values()))
    client.register_system_shared_memory(name, key, total)
    try:
        model = f"{plan.name}.{cloud.name}"
        offsets = np.cumsum([0] + [a.nbytes for a in arrays.values()])
        via_shm = client.infer(model, [shm_input(n, a, name, int(o))
                                       for (n, a), o in zip(arrays.items(), offsets)])
        raw_inputs = []
        for n, a in arrays.items():
            tensor = triton.InferInput(n, list(a.shape), "FP32")
            tensor.set_data_from_numpy(a)
            raw_inputs.append(tensor)
        via_raw = client.infer(model, raw_inputs)
        for output in via_raw.get_response().outputs:
            np.testing.assert_array_equal(via_shm.as_numpy(output.name),
                                          via_raw.as_numpy(output.name))
    finally:
        client.unregister_system_shared_memory(name)
        client.close()


@pytest.mark.parametrize("offset, byte_size, fragment", [
    (0, 100, "model 'resnet_like' input 'image': shared_memory_byte_size is 100, shape "
             "[1,3,32,32] FP32 needs 12288"),
    (64, 12288, "model 'resnet_like' input 'image': offset 64 + byte size 12288 runs past the "
                "end of shared memory region"),
])
def test_bad_offset_or_size_is_invalid_argument(triton_client, region, offset, byte_size,
                                                fragment):
    image = np.zeros((1, 3, 32, 32), np.float32)
    name, key, _ = region(image.nbytes)
    triton_client.register_system_shared_memory(name, key, image.nbytes)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, triton_client.infer,
                 "resnet_like", [shm_input("image", image, name, offset, byte_size)])


def test_output_region_too_small_is_invalid_argument(triton_client, region):
    image = np.zeros((1, 3, 32, 32), np.float32)
    name, key, handle = region(image.nbytes + 8)
    triton_client.register_system_shared_memory(name, key, image.nbytes + 8)
    output = triton.InferRequestedOutput(OUTPUT)
    output.set_shared_memory(name, 8, offset=image.nbytes)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 "output 'gemm_77_out': shared_memory_byte_size is 8, the output (shape [1,10]) "
                 "needs 40", triton_client.infer, "resnet_like",
                 [shm_input("image", image, name)], outputs=[output])


def test_unknown_region_and_unregister(triton_client, region):
    image = np.zeros((1, 3, 32, 32), np.float32)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "input 'image': shared memory region "
                 "'nowhere' is not registered with tier 'device'", triton_client.infer,
                 "resnet_like", [shm_input("image", image, "nowhere")])
    expect_error(grpc.StatusCode.NOT_FOUND, "no shared memory region 'nowhere'",
                 triton_client.get_system_shared_memory_status, "nowhere")
    names = []
    for _ in range(3):
        name, key, _ = region(image.nbytes)
        triton_client.register_system_shared_memory(name, key, image.nbytes)
        names.append(name)
    triton_client.infer("resnet_like", [shm_input("image", image, names[0])])
    triton_client.unregister_system_shared_memory(names[0])
    assert sorted(triton_client.get_system_shared_memory_status().regions) == sorted(names[1:])
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, f"region {names[0]!r} is not registered",
                 triton_client.infer, "resnet_like", [shm_input("image", image, names[0])])
    triton_client.unregister_system_shared_memory("never_registered")  # no error, as Triton
    triton_client.unregister_system_shared_memory()  # all
    assert not triton_client.get_system_shared_memory_status().regions


def test_bad_registrations_get_precise_errors(triton_client, region):
    name, key, _ = region(1024)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "cannot open key '/wpk_no_such_object' "
                 "(No such file or directory)", triton_client.register_system_shared_memory,
                 "r", "/wpk_no_such_object", 16)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "offset 1000 + byte_size 100 runs past the "
                 f"end of key {key!r} (1024 bytes)",
                 triton_client.register_system_shared_memory, name, key, 100, offset=1000)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "key '/../etc/passwd' is not a POSIX "
                 "shared memory name", triton_client.register_system_shared_memory, "r",
                 "/../etc/passwd", 16)
    triton_client.register_system_shared_memory(name, key, 1024)
    expect_error(grpc.StatusCode.ALREADY_EXISTS, f"region {name!r} is already registered",
                 triton_client.register_system_shared_memory, name, key, 512)


def test_cuda_shared_memory_is_unimplemented(triton_client):
    expect_error(grpc.StatusCode.UNIMPLEMENTED, "CUDA shared memory is not supported by wpk "
                 "tiers", triton_client.get_cuda_shared_memory_status)


def test_inference_client_shared_memory_names_a_removed_way_in_and_means_the_tensor_link(
        plans, resnet_pipeline):
    """InferenceClient(shared_memory=True) (inputs in registered regions, removed from the
    client): one warning, then the tensor link (whose lanes carry large inputs on this host);
    many requests in flight each get their own answer, and no region is registered."""
    feeds = [model_feeds(plans["resnet"], seed=s) for s in range(6)]
    expected = [reference(plans["resnet"], f)[OUTPUT] for f in feeds]

    async def run():
        with pytest.warns(UserWarning, match=r"shared_memory=True\): inputs in shared-memory "
                                             r"regions were removed"):
            client = InferenceClient(resnet_pipeline.entry, timeout=10, shared_memory=True)
        async with client:
            answers = await asyncio.gather(*(client.infer("resnet_like", f) for f in feeds))
            for answer, want in zip(answers, expected):
                np.testing.assert_allclose(answer[OUTPUT], want, rtol=1e-5, atol=1e-6)
            assert client.transport == "tcp"
            assert not await client.shared_memory_status()
            with pytest.raises(TierError) as info:  # errors still carry the status
                await client.infer("resnet_like", {"image": np.zeros((1, 3), np.float32)})
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def test_no_shared_memory_turns_the_extension_off(plans, region):
    """`wpk-serve --no-shared-memory`: not advertised, RPCs and inputs refused clearly."""
    from wpk.runtime.server import serve

    image = np.zeros((1, 3, 32, 32), np.float32)
    name, key, _ = region(image.nbytes)

    async def run():
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(serve(str(plans["mlp"]), "cloud", port=0, threads=1,
                                           shared_memory=False, ready=ready, stop=stop,
                                           announce=lambda line: None))
        await ready.wait()
        try:
            async with InferenceClient(f"127.0.0.1:{ready.port}", timeout=10) as client:
                metadata = await client.stub.ServerMetadata(pb.ServerMetadataRequest())
                assert "system_shared_memory" not in metadata.extensions
                with pytest.raises(TierError) as info:
                    await client.shared_memory_status()
                assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
                assert "system shared memory is disabled" in info.value.details
                with pytest.raises(TierError) as info:
                    await client._call("SystemSharedMemoryRegister",
                                       pb.SystemSharedMemoryRegisterRequest(
                                           name=name, key=key, byte_size=image.nbytes), 10)
                assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
                (model,) = ready.service.models.values()  # mlp.cloud
                request = pb.ModelInferRequest(model_name=model.name)
                for meta in model.inputs.values():
                    tensor = request.inputs.add(name=meta.name, datatype=meta.kserve_datatype,
                                                shape=meta.shape)
                    tensor.parameters["shared_memory_region"].string_param = name
                    tensor.parameters["shared_memory_byte_size"].int64_param = 4
                with pytest.raises(TierError) as info:
                    await client.infer_message(request)
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "shared memory is disabled on this server" in info.value.details
        finally:
            stop.set()
            await task

    asyncio.run(run())


def test_unregistering_a_region_in_use_keeps_its_arrays_readable():
    """A request still reading a region when it is unregistered: its arrays stay valid (the
    mapping goes when the last one does), never a dangling pointer."""
    from multiprocessing import shared_memory

    from wpk.runtime.shared_memory import SharedMemoryRegistry

    memory = shared_memory.SharedMemory(create=True, size=4096)
    try:
        np.frombuffer(memory.buf, np.float32, 4)[:] = [1, 2, 3, 4]
        registry = SharedMemoryRegistry("tier 'test'")
        registry.register("r", f"/{memory.name}", 0, 4096)
        params = pb.ModelInferRequest().inputs.add().parameters
        params["shared_memory_region"].string_param = "r"
        params["shared_memory_byte_size"].int64_param = 16
        array = registry.input_array("m", "x", "FP32", (2, 2), params)
        registry.unregister("r")
        assert not registry.regions
        assert array.tolist() == [[1, 2], [3, 4]]
        registry.register("r", f"/{memory.name}", 0, 4096)
        registry.close()  # nothing in use: unmapped now
        assert not registry.regions
    finally:
        memory.close()
        memory.unlink()
