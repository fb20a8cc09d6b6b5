"""Build and read ModelInfer messages: numpy arrays in, numpy arrays out.

Shared by the tier servers and `InferenceClient`. Responses always use
`raw_output_contents` (what tritonclient reads); requests may use raw or typed contents.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from wpk.runtime import protocol as pb
from wpk.runtime.protocol import parameter_value, set_parameter  # noqa: F401 (re-exported)
from wpk.runtime.shared_memory import SharedMemoryRegistry, uses_shared_memory
from wpk.runtime.codecs import CODEC_PARAM, SCALE_PARAM, DecodeError, Encoder, decode
from wpk.runtime.tensors import (TensorError, array_from_raw, array_from_typed,
                                 check_tensor, datatype_of, dtype_of)
from wpk.runtime.zero_copy_messages import (RAW_INPUT_FIELD, RAW_OUTPUT_FIELD,
                                            STREAM_RESPONSE_FIELD, Prebuilt, Received)
from wpk.tensor_spec import TensorSpec

# request parameters wpk reads (all optional for other clients; see docs/runtime.md)
PIPELINE_PARAM = "wpk_pipeline"    # bool: continue down the chain from this tier
TIMEOUT_PARAM = "wpk_timeout_ms"   # double, on streams: time left for this request
STATUS_PARAM = "wpk_status"        # int64, a stream answer's: gRPC code of a failed request


def build_request(model: str, arrays: Mapping[str, np.ndarray],
                  outputs: Sequence[str] | None = None, *, encoder: Encoder | None = None,
                  parameters: Mapping[str, str | float | bool | int] | None = None,
                  request_id: str = "") -> Prebuilt:
    """A ModelInferRequest with raw contents (encoded by `encoder` when given); the tensor
    data is copied once, when gRPC serializes it (see zero_copy_messages)."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters, key, value)
    buffers = []
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=datatype_of(array.dtype),
                                    shape=array.shape)
        if encoder is None:
            buffers.append(np.ascontiguousarray(array))
            continue
        data, params = encoder.encode(array)
        for key, value in params.items():
            set_parameter(tensor.parameters, key, value)
        buffers.append(data)
    for name in outputs or ():
        request.outputs.add(name=name)
    return Prebuilt(request, RAW_INPUT_FIELD, buffers)


def _tensor_array(model: str, tensor, data: bytes | None) -> np.ndarray:
    shape = tuple(tensor.shape)
    if data is None:
        return array_from_typed(model, tensor.name, tensor.datatype, shape, tensor.contents)
    params = tensor.parameters
    if CODEC_PARAM not in params:
        return array_from_raw(model, tensor.name, tensor.datatype, shape, data)
    codec = parameter_value(params[CODEC_PARAM])
    scale = parameter_value(params[SCALE_PARAM]) if SCALE_PARAM in params else None
    try:
        return decode(data, dtype_of(tensor.datatype), shape, str(codec), scale)
    except DecodeError as error:
        raise TensorError(f"model {model!r} input {tensor.name!r}: {error}") from None


def parse_inputs(request, model: str, inputs: Mapping[str, TensorSpec],
                 shared_memory: SharedMemoryRegistry | None = None) -> dict[str, np.ndarray]:
    """The request's tensors as arrays, checked against `inputs` (names, types, shapes, sizes).
    Inputs naming a `shared_memory_region` are views of that region in `shared_memory`; the
    raw contents, in order, belong to the other inputs (as in Triton)."""
    raw = request.raw_input_contents
    in_memory = [uses_shared_memory(t.parameters) for t in request.inputs]
    if any(in_memory) and shared_memory is None:
        raise TensorError(f"model {model!r}: an input names a shared memory region, but "
                          f"shared memory is disabled on this server")
    sent = len(in_memory) - sum(in_memory)
    if raw and len(raw) != sent:
        raise TensorError(f"model {model!r}: raw_input_contents has {len(raw)} entries for "
                          f"{sent} inputs" + (" not in shared memory" if any(in_memory) else ""))
    arrays: dict[str, np.ndarray] = {}
    raw_index = 0
    for tensor, shared in zip(request.inputs, in_memory):
        meta = inputs.get(tensor.name)
        if meta is None:
            raise TensorError(f"model {model!r} has no input {tensor.name!r} "
                              f"(inputs: {', '.join(inputs)})")
        if tensor.name in arrays:
            raise TensorError(f"model {model!r}: input {tensor.name!r} given twice")
        check_tensor(model, meta, tensor.datatype, tuple(tensor.shape))
        if shared:
            if CODEC_PARAM in tensor.parameters:
                raise TensorError(f"model {model!r} input {tensor.name!r}: {CODEC_PARAM} "
                                  f"cannot be used with shared memory")
            arrays[tensor.name] = shared_memory.input_array(
                model, tensor.name, tensor.datatype, tuple(tensor.shape), tensor.parameters)
            continue
        if not raw and not tensor.HasField("contents"):
            raise TensorError(f"model {model!r} input {tensor.name!r}: no data (neither "
                              f"raw_input_contents nor contents)")
        arrays[tensor.name] = _tensor_array(model, tensor, raw[raw_index] if raw else None)
        raw_index += 1
    missing = [name for name in inputs if name not in arrays]
    if missing:
        raise TensorError(f"model {model!r}: missing input{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(m) for m in missing)}")
    return arrays


def requested_outputs(request, model: str, available: Sequence[str]) -> list[str]:
    """Names the caller asked for (all of `available` when none), checked."""
    if not request.outputs:
        return list(available)
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise TensorError(f"model {model!r} has no output {unknown[0]!r} "
                          f"(outputs: {', '.join(available)})")
    return names


def build_response(model: str, arrays: Mapping[str, np.ndarray], request_id: str = "",
                   stream: bool = False, in_shared_memory: Mapping | None = None) -> Prebuilt:
    """A ModelInferResponse with raw_output_contents (what tritonclient reads); with
    `stream`, wrapped as the `infer_response` of a ModelStreamInferResponse. Outputs named
    in `in_shared_memory` (name -> the request's output parameters) were written there: they
    carry those parameters and no bytes (an empty raw entry when others have bytes, so that
    raw entries stay one per output)."""
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    in_shared_memory = in_shared_memory or {}
    buffers = []
    for name, array in arrays.items():
        tensor = response.outputs.add(name=name, datatype=datatype_of(array.dtype),
                                      shape=array.shape)
        if name in in_shared_memory:
            for key, param in in_shared_memory[name].items():
                tensor.parameters[key].CopyFrom(param)
            buffers.append(b"")
        else:
            buffers.append(np.ascontiguousarray(array))
    if len(in_shared_memory) == len(buffers):
        buffers = []
    return Prebuilt(response, RAW_OUTPUT_FIELD, buffers,
                    wrap_field=STREAM_RESPONSE_FIELD if stream else None)


def parse_response(response) -> dict[str, np.ndarray]:
    """Output arrays of a ModelInferResponse (raw, typed or wpk-encoded contents)."""
    raw = response.raw_output_contents
    model = response.model_name
    return {tensor.name: _tensor_array(model, tensor, raw[i] if raw else None)
            for i, tensor in enumerate(response.outputs)
            if not uses_shared_memory(tensor.parameters)}  # those are in the caller's region


def payload_bytes(message) -> int:
    """Bytes a message puts on the wire (tensor data of a Prebuilt; the whole message as
    received for a Received; else the whole message, which reading the raw contents back
    would copy)."""
    kind = type(message)
    if kind is Prebuilt or kind is Received:
        return message.nbytes
    return message.ByteSize()
