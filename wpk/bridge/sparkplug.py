"""Eclipse Sparkplug B inputs: `spBv1.0/<group>/<type>/<edge_node>[/<device>]` topics.

Sparkplug DATA messages report by exception (only changed metrics) and may name metrics by the
alias their BIRTH message bound, so the bridge keeps each node's and device's last known
metric values, as a Sparkplug host application does:

- NBIRTH/DBIRTH: (re)define the metric set (names, aliases, datatypes, values); no inference.
- NDATA/DDATA: update the values, then infer on the full current set.
- NDEATH/DDEATH: forget the node's (and its devices') or the device's state.

Metrics become model inputs by name when every model input is a metric of that name;
otherwise a one-input model gets the numeric metrics concatenated, in `metrics` order when
given (`--metrics a,b,c`), else in the order of the BIRTH message.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

import numpy as np

from wpk.plan import SourceModel

from ._generated import sparkplug_b_pb2 as pb
from .formats import Parsed, PayloadError
from .tensors import fit, model_input

log = logging.getLogger("wpk.bridge.sparkplug")

NAMESPACE = "spBv1.0"
DataType = pb.DataType
Payload = pb.Payload

_SCALAR_DTYPES = {
    DataType.Int8: np.int8, DataType.Int16: np.int16, DataType.Int32: np.int32,
    DataType.Int64: np.int64, DataType.UInt8: np.uint8, DataType.UInt16: np.uint16,
    DataType.UInt32: np.uint32, DataType.UInt64: np.uint64, DataType.Float: np.float32,
    DataType.Double: np.float64, DataType.Boolean: np.bool_, DataType.DateTime: np.uint64,
}
_ARRAY_DTYPES = {
    DataType.Int8Array: "<i1", DataType.Int16Array: "<i2", DataType.Int32Array: "<i4",
    DataType.Int64Array: "<i8", DataType.UInt8Array: "<u1", DataType.UInt16Array: "<u2",
    DataType.UInt32Array: "<u4", DataType.UInt64Array: "<u8", DataType.FloatArray: "<f4",
    DataType.DoubleArray: "<f8", DataType.DateTimeArray: "<u8",
}
_MESSAGE_TYPES = {"NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD"}


@dataclass(frozen=True)
class SparkplugTopic:
    group: str
    message_type: str
    edge_node: str
    device: str | None

    @classmethod
    def parse(cls, topic: str) -> "SparkplugTopic":
        levels = topic.split("/")
        if len(levels) not in (4, 5) or levels[0] != NAMESPACE \
                or levels[2] not in _MESSAGE_TYPES:
            raise PayloadError(f"not a Sparkplug B topic: {topic!r} (want {NAMESPACE}/<group>/"
                               "<NBIRTH|NDATA|DBIRTH|DDATA|...>/<edge_node>[/<device>])")
        device = levels[4] if len(levels) == 5 else None
        if (levels[2][0] == "D") != (device is not None):
            raise PayloadError(f"Sparkplug topic {topic!r}: {levels[2]} "
                               f"{'needs' if device is None else 'takes no'} device level")
        return cls(levels[1], levels[2], levels[3], device)


def metric_value(metric: pb.Payload.Metric, datatype: int) -> np.ndarray | None:
    """A metric's value as a numpy array (scalar: 0-d), None if null; PayloadError if not
    numeric."""
    if metric.is_null:
        return None
    kind = metric.WhichOneof("value")
    if kind is None:
        return None
    if datatype in _ARRAY_DTYPES:
        raw = metric.bytes_value
        width = np.dtype(_ARRAY_DTYPES[datatype]).itemsize
        if kind != "bytes_value" or len(raw) % width:
            raise PayloadError(f"metric {metric.name or metric.alias}: malformed array value")
        return np.frombuffer(raw, dtype=_ARRAY_DTYPES[datatype]).copy()
    if datatype == DataType.BooleanArray and kind == "bytes_value":
        raw = metric.bytes_value
        if len(raw) < 4:
            raise PayloadError(f"metric {metric.name or metric.alias}: malformed BooleanArray")
        (count,) = struct.unpack("<I", raw[:4])
        bits = np.unpackbits(np.frombuffer(raw[4:], dtype=np.uint8))  # most significant first
        if bits.size < count:
            raise PayloadError(f"metric {metric.name or metric.alias}: BooleanArray too short")
        return bits[:count].astype(np.bool_)
    if kind == "dataset_value":
        return _dataset_array(metric)
    if kind in ("int_value", "long_value"):
        value = getattr(metric, kind)
        bits = 32 if kind == "int_value" else 64
        dtype = np.dtype(_SCALAR_DTYPES.get(datatype, np.uint32 if bits == 32 else np.uint64))
        if dtype.kind == "i":  # two's complement in an unsigned field
            value = value - (1 << bits) if value >= 1 << (bits - 1) else value
        return np.array(value, dtype=dtype)
    if kind in ("float_value", "double_value"):
        return np.array(getattr(metric, kind),
                        dtype=np.float32 if kind == "float_value" else np.float64)
    if kind == "boolean_value":
        return np.array(metric.boolean_value, dtype=np.bool_)
    raise PayloadError(f"metric {metric.name or metric.alias}: {kind.removesuffix('_value')} "
                       "values are not numeric")


def _dataset_array(metric: pb.Payload.Metric) -> np.ndarray:
    dataset = metric.dataset_value
    rows = []
    for row in dataset.rows:
        values = []
        for element in row.elements:
            kind = element.WhichOneof("value")
            if kind not in ("int_value", "long_value", "float_value", "double_value",
                            "boolean_value"):
                raise PayloadError(f"metric {metric.name or metric.alias}: DataSet cell "
                                   f"of kind {kind} is not numeric")
            values.append(getattr(element, kind))
        rows.append(values)
    try:
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    except ValueError:
        raise PayloadError(f"metric {metric.name or metric.alias}: ragged DataSet") from None


@dataclass
class _Entity:
    """One edge node or device: what its BIRTH declared and the last value of each metric."""

    order: list[str] = field(default_factory=list)
    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)


class SparkplugFormat:
    name = "sparkplug"

    def __init__(self, metrics: list[str] | None = None):
        self.metrics = metrics
        self.entities: dict[tuple[str, str, str | None], _Entity] = {}
        self.last_seq: dict[tuple[str, str], int] = {}
        self.sequence_gaps = 0

    def parse(self, topic: str, payload: bytes) -> Parsed:
        where = SparkplugTopic.parse(topic)
        message = Payload()
        try:
            message.ParseFromString(payload)
        except Exception as error:  # protobuf raises DecodeError (and friends)
            raise PayloadError(f"not a Sparkplug B payload: {error}") from None
        key = (where.group, where.edge_node, where.device)
        echo = {"sparkplug_seq": message.seq} if message.HasField("seq") else {}
        timestamp = float(message.timestamp) if message.HasField("timestamp") else None
        self._check_seq(where, message)
        kind = where.message_type[1:]
        if kind == "DEATH":
            for entity_key in [k for k in self.entities if k[:2] == key[:2]
                               and (where.device is None or k == key)]:
                del self.entities[entity_key]
            return Parsed(None, infer=False, echo=echo)
        if kind == "CMD":
            return Parsed(None, infer=False, echo=echo)
        if kind == "BIRTH":
            if where.device is None:  # a node rebirth invalidates its devices too
                for entity_key in [k for k in self.entities if k[:2] == key[:2]]:
                    del self.entities[entity_key]
            self.entities[key] = _Entity()
        entity = self.entities.get(key)
        if entity is None:
            raise PayloadError(f"{where.message_type} from {topic!r} before its BIRTH: "
                               "metric names and aliases are unknown")
        self._update(entity, message, birth=kind == "BIRTH")
        if kind == "BIRTH":
            return Parsed(None, infer=False, source_timestamp_ms=timestamp, echo=echo)
        return Parsed(dict(entity.values), source_timestamp_ms=timestamp, echo=echo)

    def _check_seq(self, where: SparkplugTopic, message: pb.Payload) -> None:
        if not message.HasField("seq"):
            return
        node = (where.group, where.edge_node)
        previous = self.last_seq.get(node)
        birth = where.message_type == "NBIRTH"
        if previous is not None and not birth and message.seq != (previous + 1) % 256:
            self.sequence_gaps += 1
            log.warning("Sparkplug seq gap from %s/%s: %d after %d", *node, message.seq,
                        previous)
        self.last_seq[node] = message.seq

    @staticmethod
    def _update(entity: _Entity, message: pb.Payload, birth: bool) -> None:
        for metric in message.metrics:
            if metric.HasField("name"):
                name = metric.name
                if metric.HasField("alias"):
                    entity.aliases[metric.alias] = name
            elif metric.HasField("alias") and metric.alias in entity.aliases:
                name = entity.aliases[metric.alias]
            else:
                raise PayloadError(f"metric with unknown alias {metric.alias}")
            if metric.HasField("datatype"):
                entity.datatypes[name] = metric.datatype
            if birth and name not in entity.order:
                entity.order.append(name)
            if metric.is_historical:
                continue
            value = _numeric_or_none(metric, entity.datatypes.get(name, DataType.Unknown), birth)
            if value is None:
                entity.values.pop(name, None)
            else:
                entity.values[name] = value

    def to_inputs(self, parsed: Parsed, signature: SourceModel) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = parsed.body
        names = [spec.name for spec in signature.inputs]
        if all(name in values for name in names):
            out = {}
            for name in names:
                try:
                    out[name] = fit(model_input(signature, name), values[name])
                except ValueError as error:
                    raise PayloadError(str(error)) from None
            return out
        if len(names) != 1:
            missing = [n for n in names if n not in values]
            raise PayloadError(f"no metric for model input(s) {', '.join(missing)}")
        order = self.metrics or [n for n in values]  # dict keeps BIRTH order, then later ones
        missing = [n for n in order if n not in values]
        if missing:
            raise PayloadError(f"no current value for metric(s) {', '.join(missing)}")
        vector = np.concatenate([np.ravel(values[n]).astype(np.float64) for n in order])
        try:
            return {names[0]: fit(signature.inputs[0], vector)}
        except ValueError as error:
            raise PayloadError(f"{len(order)} metrics -> {vector.size} values: {error}") from None


def _numeric_or_none(metric: pb.Payload.Metric, datatype: int, birth: bool) -> np.ndarray | None:
    """Non-numeric metrics in a BIRTH (strings, templates) are kept out, not rejected."""
    try:
        return metric_value(metric, datatype)
    except PayloadError:
        if birth:
            return None
        raise


# ---- building payloads (tests, benchmarks, simulators) -------------------------------------

def make_metric(name: str | None, value, datatype: int | None = None,
                alias: int | None = None) -> pb.Payload.Metric:
    """A metric from a Python or numpy value (None: a null metric); arrays use the packed
    *Array types."""
    metric = Payload.Metric()
    if name is not None:
        metric.name = name
    if alias is not None:
        metric.alias = alias
    if value is None or isinstance(value, str):
        metric.datatype = datatype or DataType.String
        if value is None:
            metric.is_null = True
        else:
            metric.string_value = value
        return metric
    array = np.asarray(value)
    if array.ndim:
        inverse = {np.dtype(v).newbyteorder("<"): k for k, v in _ARRAY_DTYPES.items()
                   if k != DataType.DateTimeArray}
        datatype = datatype or inverse[array.dtype.newbyteorder("<")]
        metric.datatype = datatype
        metric.bytes_value = np.ascontiguousarray(array, dtype=_ARRAY_DTYPES[datatype]).tobytes()
        return metric
    if datatype is None:
        datatype = {"f": DataType.Double if array.dtype == np.float64 else DataType.Float,
                    "b": DataType.Boolean}.get(array.dtype.kind, DataType.Int64)
    metric.datatype = datatype
    if datatype == DataType.Float:
        metric.float_value = float(array)
    elif datatype == DataType.Double:
        metric.double_value = float(array)
    elif datatype == DataType.Boolean:
        metric.boolean_value = bool(array)
    elif datatype in (DataType.Int64, DataType.UInt64, DataType.DateTime):
        metric.long_value = int(array) & (2**64 - 1)
    else:
        metric.int_value = int(array) & (2**32 - 1)
    return metric


def make_payload(metrics: list[pb.Payload.Metric], seq: int | None = None,
                 timestamp_ms: int | None = None) -> bytes:
    message = Payload(metrics=metrics)
    if seq is not None:
        message.seq = seq % 256
    if timestamp_ms is not None:
        message.timestamp = timestamp_ms
    return message.SerializeToString()
