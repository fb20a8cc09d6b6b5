"""An MLServer runtime that runs an .onnx file with ONNX Runtime, for
benchmarks/serving_peers.py (no ONNX Runtime runtime for MLServer is published on PyPI).

model-settings.json: {"implementation": "benchmarks.mlserver_onnx.OnnxRuntimeModel",
"parameters": {"uri": "/path/model.onnx"}}; the repository root on PYTHONPATH.
"""
from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from benchmarks.runtime_overhead import session

THREADS = 1   # ONNX Runtime intra-op threads, as every other contender of the benchmark


class OnnxRuntimeModel(MLModel):
    """One ORT session, run on MLServer's event loop (parallel_workers 0: no worker
    process between the server and the model)."""

    async def load(self) -> bool:
        self._session = session(self.settings.parameters.uri, THREADS)
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=[
            NumpyCodec.encode_output(name, array) for name, array in zip(self._outputs,
                                                                           results)])
