"""A minimal Open Inference Protocol server for wpk-probe tests, standing in for a foreign
server (Triton, MLServer): ServerLive answers live, ServerMetadata names itself, ModelInfer
reads the whole request and answers NOT_FOUND, as a wpk tier does for a model it does not
serve. ModelInfer takes the request as raw bytes and records their length, so a test can
check that the payload really crossed; `max_receive` makes it refuse large messages."""
from __future__ import annotations

from concurrent import futures

import grpc

from wpk.runtime import protocol as pb

SERVICE = pb.SERVICE


class StubServer:
    def __init__(self, name: str = "wpk (demo.edge)", max_receive: int = 256 << 20,
                 bind: str = "127.0.0.1:0"):
        self.received: list[int] = []
        self.name = name
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
            ("grpc.max_receive_message_length", max_receive),
            ("grpc.max_send_message_length", max_receive), ("grpc.so_reuseport", 0)])
        handlers = {
            "ServerLive": grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.ServerLiveResponse(live=True).SerializeToString()),
            "ServerMetadata": grpc.unary_unary_rpc_method_handler(self._metadata),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.host = bind.rsplit(":", 1)[0]
        self.port = self.server.add_insecure_port(bind)

    def _metadata(self, request: bytes, context) -> bytes:
        return pb.ServerMetadataResponse(name=self.name).SerializeToString()

    def _infer(self, request: bytes, context) -> bytes:
        self.received.append(len(request))
        context.abort(grpc.StatusCode.NOT_FOUND, "no model '__wpk_probe__'")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> "StubServer":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
