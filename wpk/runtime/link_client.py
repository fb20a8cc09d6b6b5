"""`LinkClient`: an `InferenceClient` entering a wpk pipeline over the entry tier's tensor link
(`InferenceClient(address, tensor_link=True)`; see client), under the name callers know.

    async with LinkClient("127.0.0.1:8001") as client:
        outputs = await client.infer("resnet_like", {"image": image}, timeout=5)
"""
from __future__ import annotations

from wpk.runtime.client import InferenceClient


class LinkClient(InferenceClient):
    def __init__(self, address: str, **options):
        super().__init__(address, tensor_link=True, **options)

    @property
    def grpc(self) -> InferenceClient:
        """Metadata, health and shared-memory calls (gRPC calls on this client itself)."""
        return self
