"""A small real KServe v2 gRPC server over one ONNX Runtime session, for the bridge tests.

Stands in for the pipeline until wpk.runtime's tier servers are on main; runs as its own
process so that tests can kill and restart it:
    python kserve_ort_server.py MODEL.onnx --name mlp --port 8001 [--delay-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ORT_TO_KSERVE = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
                 "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL",
                 "tensor(float16)": "FP16", "tensor(int8)": "INT8"}
KSERVE_TO_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
                   "UINT8": np.uint8, "BOOL": np.bool_, "FP16": np.float16, "INT8": np.int8}


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model_path: str, name: str, delay_s: float):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options,
                                            providers=["CPUExecutionProvider"])
        self.name = name
        self.delay_s = delay_s

    def _specs(self, values):
        return [pb.ModelMetadataResponse.TensorMetadata(
            name=v.name, datatype=ORT_TO_KSERVE[v.type],
            shape=[d if isinstance(d, int) else -1 for d in v.shape]) for v in values]

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ModelMetadata(self, request, context):
        if request.name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return pb.ModelMetadataResponse(name=self.name, platform="onnxruntime",
                                        inputs=self._specs(self.session.get_inputs()),
                                        outputs=self._specs(self.session.get_outputs()))

    async def ModelInfer(self, request, context):
        if request.model_name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name!r}")
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents):
            feeds[tensor.name] = np.frombuffer(raw, KSERVE_TO_NUMPY[tensor.datatype]).reshape(
                tuple(tensor.shape))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        try:
            results = self.session.run(None, feeds)
        except Exception as error:  # bad shapes etc.: the caller's fault
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error).splitlines()[0])
        reply = pb.ModelInferResponse(model_name=self.name, id=request.id)
        for meta, array in zip(self.session.get_outputs(), results):
            reply.outputs.add(name=meta.name, datatype=ORT_TO_KSERVE[meta.type],
                              shape=array.shape)
            reply.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return reply


async def serve(model: str, name: str, port: int, delay_ms: float) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 30),
                                      ("grpc.max_send_message_length", 1 << 30),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        Servicer(model, name, delay_ms / 1e3), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.model, args.name, args.port, args.delay_ms))
