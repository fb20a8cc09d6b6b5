"""Generated kernels (Winograd convolutions, fused expansion + depthwise convolutions) as ONNX
Runtime custom operators, so that a mixed slice runs as one ONNX Runtime session instead of a
chain of sub-sessions and kernel calls.

Why: cutting a slice into segments costs more than the kernels save (every cut is a session
run with its own feeds, fetches and NCHWc reorders). As custom operators, the kernels run
inside ONNX Runtime's own executor, on its intra-op thread pool (`KernelContext_ParallelFor`),
with no Python between operators.

One shared library per slice: the kernels (each compiled on its own: their helpers are
static) linked with a small glue object that implements `RegisterCustomOps` for the ops
`ai.wpk::WinogradConv` and `ai.wpk::DepthwiseConv` (inputs X, U (the kernel's packed
parameters), optional B and R; int attribute `kernel` picks the compiled kernel). The glue
declares only the part of ONNX Runtime's C ABI it calls: the `OrtApi` function table is
append-only, so an index never changes between releases; the indices are checked against the
installed ONNX Runtime by `tests/optimizer/test_optimizer_ort_ops.py`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from wpk import settings
from wpk.errors import WpkError
from wpk.optimizer import (activations, attention_kernel, build, channel_scale, depthwise,
                           direct_conv, layer_norm, nan_guard, pool, winograd)

DOMAIN = "ai.wpk"
NCHWC_DOMAIN = "com.microsoft.nchwc"   # ONNX Runtime's blocked-layout operators
# custom op type per kernel kind (KernelSpec.op)
OP_TYPES = {"winograd": "WinogradConv", "nchwc_depthwise": "DepthwiseConv",
            "channel_scale": "ChannelScale", "nchwc_direct": "DirectConv",
            "direct_gemm": "DirectGemm", "layer_norm": "LayerNorm", "nan_guard": "NanGuard",
            "attention": "Attention"}
# kernel kinds of `direct_conv`'s generator: NCHWc convolutions and row-major GEMMs
DIRECT_OPS = ("nchwc_direct", "direct_gemm")
# kernel kinds on plain row-major tensors (any shape of the right size in, `y_shape` out)
ROW_OPS = ("layer_norm", "nan_guard", "attention")
# kernel kinds a library built without AVX-512 (`portable_simd.py`'s shim) offers: the
# row-major ones. The others read or write ONNX Runtime's NCHWc tensors, whose blocks
# are 16 channels (one __m512) only where ONNX Runtime itself runs on AVX-512.
PORTABLE_OPS = ("direct_gemm", *ROW_OPS)
# the two builds of a library: "avx512" (x86-64-v4, every kind) and "portable"
ISAS = ("avx512", "portable")
LIBRARY_FILE = "wpk_ops.so"
# Bumped when a saved library must not be trusted any more; an optimized directory records
# the build its library came from. 2: built with build.NO_INVENTED_STORES (build 1 libraries
# could lose output tiles when split over many threads).
LIBRARY_BUILD = 2
# ONNX Runtime >= 1.17: the first C API level with KernelContext_ParallelFor
API_LEVEL = 17
# OrtApi table indices (positions in struct OrtApi; the table only ever grows at its end)
API_INDEX = dict(
    CREATE_STATUS=0, CREATE_CUSTOM_OP_DOMAIN=26, CUSTOM_OP_DOMAIN_ADD=27,
    ADD_CUSTOM_OP_DOMAIN=28, GET_TENSOR_MUTABLE_DATA=51, GET_TENSOR_ELEMENT_TYPE=60,
    GET_DIMENSIONS_COUNT=61, GET_DIMENSIONS=62, GET_TENSOR_TYPE_AND_SHAPE=65,
    KERNEL_INFO_GET_ATTRIBUTE_INT64=86, KERNEL_CONTEXT_GET_INPUT_COUNT=88,
    KERNEL_CONTEXT_GET_INPUT=90, KERNEL_CONTEXT_GET_OUTPUT=91, RELEASE_STATUS=93,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO=99, KERNEL_CONTEXT_PARALLEL_FOR=274)

LINK_FLAGS = ["-shared", "-fPIC"]
# x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), not -march=native: a slice's library then runs on every
# AVX-512 machine its directory is copied to (`runs_here` checks the flags before loading it).
# The portable build swaps the -march for `portable_target`'s (`object_flags`).
OBJECT_FLAGS = ["-O3", "-march=x86-64-v4", "-mtune=native", "-fPIC", "-fno-math-errno",
                *build.NO_INVENTED_STORES,
                "-fvisibility=hidden",
                # the kernels' pool calls go to this library's ParallelFor bridge, never to a
                # pool library the process may have loaded globally for segment kernels
                "-Dwpk_pool_run=wpk_ort_pool_run", "-Dwpk_pool_slots=wpk_ort_pool_slots",
                "-Dwpk_thread_scratch=wpk_ort_thread_scratch",
                "-Dwpk_kernel_failed=wpk_ort_kernel_failed"]

GLUE = r"""
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;
typedef struct { const void* const* (*GetApi)(uint32_t); const char* (*GetVersionString)(void); }
    OrtApiBase;

%(indices)s
static const void* const* api;
#define CALL(index, type) ((type)api[index])
#define TRY(expr) do { OrtStatus* status_ = (expr); if (status_) return status_; } while (0)

typedef OrtStatus* (*create_status_t)(int, const char*);
typedef OrtStatus* (*create_domain_t)(const char*, OrtCustomOpDomain**);
typedef OrtStatus* (*domain_add_t)(OrtCustomOpDomain*, const void*);
typedef OrtStatus* (*add_domain_t)(OrtSessionOptions*, OrtCustomOpDomain*);
typedef OrtStatus* (*mutable_data_t)(OrtValue*, void**);
typedef OrtStatus* (*element_type_t)(const OrtShape*, int*);
typedef OrtStatus* (*dims_count_t)(const OrtShape*, size_t*);
typedef OrtStatus* (*dims_t)(const OrtShape*, int64_t*, size_t);
typedef OrtStatus* (*type_shape_t)(const OrtValue*, OrtShape**);
typedef OrtStatus* (*attr_int64_t)(const OrtKernelInfo*, const char*, int64_t*);
typedef OrtStatus* (*input_count_t)(const OrtKernelContext*, size_t*);
typedef OrtStatus* (*get_input_t)(const OrtKernelContext*, size_t, const OrtValue**);
typedef OrtStatus* (*get_output_t)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
typedef void (*release_t)(void*);
typedef OrtStatus* (*parallel_for_t)(const OrtKernelContext*, void (*)(void*, size_t), size_t,
                                     size_t, void*);

static OrtStatus* fail(const char* message) {
  return CALL(CREATE_STATUS, create_status_t)(2 /* ORT_INVALID_ARGUMENT */, message);
}

/* ---- the kernels' thread pool: ONNX Runtime's intra-op pool through ParallelFor ---------- */
typedef void (*item_fn)(int item, int slot, void* ctx);
struct job { item_fn fn; void* ctx; int total; atomic_int next; };
static __thread const OrtKernelContext* running_context;

static void run_slot(void* arg, size_t slot) {
  struct job* job = (struct job*)arg;
  int item;
  while ((item = atomic_fetch_add(&job->next, 1)) < job->total) job->fn(item, (int)slot, job->ctx);
}

int wpk_ort_pool_slots(void) { return %(slots)d; }

/* Each ParallelFor index is one scratch slot, run once; items are claimed dynamically, so a
   late thread takes fewer (or none: the caller may run every slot itself). */
void wpk_ort_pool_run(item_fn fn, void* ctx, int total) {
  struct job job = {fn, ctx, total, 0};
  const int slots = total < %(slots)d ? total : %(slots)d;
  if (slots > 1 && running_context) {
    OrtStatus* status = CALL(KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_t)(
        running_context, run_slot, (size_t)slots, 0, &job);
    if (!status) return;
    CALL(RELEASE_STATUS, release_t)(status);
  }
  run_slot(&job, 0);  /* no pool (or it refused before running anything): all on this thread */
}

/* ---- per-thread scratch for the kernels, and their failures --------------------------------- */
%(scratch)s

/* ---- the compiled kernels ------------------------------------------------------------------ */
typedef void (*kernel_fn)(const float*, const float*, const float*, const float*, float*);
struct kernel { const char* name; kernel_fn fn; int op; int64_t c, h, w, k, oh, ow, u_size;
                int bias, residual; int y_rank; int64_t y_shape[4]; int64_t r_size; };
static const char* const op_names[] = {%(op_names)s};
#define OP_COUNT ((int)(sizeof(op_names) / sizeof(op_names[0])))
%(declarations)s
static const struct kernel kernels[] = {
%(table)s
};
static const int kernel_count = (int)(sizeof(kernels) / sizeof(kernels[0]));

/* ---- the custom op --------------------------------------------------------------------- */
struct custom_op {
  uint32_t version;
  void* (*CreateKernel)(const struct custom_op*, const void*, const OrtKernelInfo*);
  const char* (*GetName)(const struct custom_op*);
  const char* (*GetExecutionProviderType)(const struct custom_op*);
  int (*GetInputType)(const struct custom_op*, size_t);
  size_t (*GetInputTypeCount)(const struct custom_op*);
  int (*GetOutputType)(const struct custom_op*, size_t);
  size_t (*GetOutputTypeCount)(const struct custom_op*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct custom_op*, size_t);
  int (*GetOutputCharacteristic)(const struct custom_op*, size_t);
  int (*GetInputMemoryType)(const struct custom_op*, size_t);
  int (*GetVariadicInputMinArity)(const struct custom_op*);
  int (*GetVariadicInputHomogeneity)(const struct custom_op*);
  int (*GetVariadicOutputMinArity)(const struct custom_op*);
  int (*GetVariadicOutputHomogeneity)(const struct custom_op*);
  OrtStatus* (*CreateKernelV2)(const struct custom_op*, const void*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const struct custom_op*, void*);
  int (*GetStartVersion)(const struct custom_op*);
  int (*GetEndVersion)(const struct custom_op*);
  size_t (*GetMayInplace)(int**, int**);
  void (*ReleaseMayInplace)(int*, int*);
  size_t (*GetAliasMap)(int**, int**);
  void (*ReleaseAliasMap)(int*, int*);
};

static struct custom_op ops[OP_COUNT];
static const char* op_name(const struct custom_op* op) { return op_names[op - ops]; }
static const char* op_provider(const struct custom_op* op) { (void)op; return NULL; }
static int op_float(const struct custom_op* op, size_t i) { (void)op; (void)i; return 1; }
static size_t op_inputs(const struct custom_op* op) { (void)op; return 4; }
static size_t op_outputs(const struct custom_op* op) { (void)op; return 1; }
static int op_input_kind(const struct custom_op* op, size_t i) { (void)op; return i >= 2; }
static int op_output_kind(const struct custom_op* op, size_t i) { (void)op; (void)i; return 0; }
static int op_memory(const struct custom_op* op, size_t i) { (void)op; (void)i; return 0; }
static int op_one(const struct custom_op* op) { (void)op; return 1; }
static int op_end_version(const struct custom_op* op) { (void)op; return 1 << 30; }

static OrtStatus* op_create(const struct custom_op* op, const void* api_, const OrtKernelInfo* info,
                            void** out) {
  (void)api_;
  int64_t index = -1;
  TRY(CALL(KERNEL_INFO_GET_ATTRIBUTE_INT64, attr_int64_t)(info, "kernel", &index));
  char message[128];
  if (index < 0 || index >= kernel_count || kernels[index].op != (int)(op - ops)) {
    snprintf(message, sizeof message, "%%s: attribute 'kernel' (%%lld) names no %%s kernel",
             op_name(op), (long long)index, op_name(op));
    return fail(message);
  }
  *out = (void*)&kernels[index];
  return NULL;
}

static void* op_create_v1(const struct custom_op* op, const void* api_, const OrtKernelInfo* info) {
  void* kernel = NULL;
  OrtStatus* status = op_create(op, api_, info, &kernel);
  if (status) CALL(RELEASE_STATUS, release_t)(status);
  return kernel;
}

/* The float data of input `index` if its shape is `expected` (NULL: any shape with `count`
   elements). */
static OrtStatus* float_input(OrtKernelContext* ctx, const struct kernel* k, size_t index,
                              const int64_t* expected, size_t rank, int64_t count,
                              const char* what, void** data) {
  const OrtValue* value = NULL;
  TRY(CALL(KERNEL_CONTEXT_GET_INPUT, get_input_t)(ctx, index, &value));
  char message[256];
  if (!value) {
    snprintf(message, sizeof message, "%%s %%s: input %%s is missing", op_names[k->op],
             k->name, what);
    return fail(message);
  }
  OrtShape* shape = NULL;
  TRY(CALL(GET_TENSOR_TYPE_AND_SHAPE, type_shape_t)(value, &shape));
  int type = 0;
  size_t dims_count = 0;
  int64_t dims[8] = {0};
  OrtStatus* status = CALL(GET_TENSOR_ELEMENT_TYPE, element_type_t)(shape, &type);
  if (!status) status = CALL(GET_DIMENSIONS_COUNT, dims_count_t)(shape, &dims_count);
  if (!status && dims_count <= 8)
    status = CALL(GET_DIMENSIONS, dims_t)(shape, dims, dims_count);
  CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_t)(shape);
  if (status) return status;
  int64_t elements = 1;
  int same = expected ? dims_count == rank : 1;
  for (size_t i = 0; i < dims_count && i < 8; ++i) {
    elements *= dims[i];
    if (expected && same && dims[i] != expected[i]) same = 0;
  }
  if (type != 1 || dims_count > 8 || !same || (!expected && elements != count)) {
    if (expected)
      snprintf(message, sizeof message,
               "%%s %%s: input %%s must be a float32 tensor of shape [%%lld, %%lld, "
               "%%lld, %%lld] (the optimized slice's)", op_names[k->op], k->name, what,
               (long long)expected[0], (long long)expected[1], (long long)expected[2],
               (long long)expected[3]);
    else
      snprintf(message, sizeof message,
               "%%s %%s: input %%s must be a float32 tensor of %%lld elements",
               op_names[k->op], k->name, what, (long long)count);
    return fail(message);
  }
  return CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_t)((OrtValue*)value, data);
}

static OrtStatus* op_compute(void* state, OrtKernelContext* ctx) {
  const struct kernel* k = (const struct kernel*)state;
  const int64_t x_dims[4] = {1, k->c, k->h, k->w};
  const int64_t y_dims[4] = {1, k->k, k->oh, k->ow};
  void *x = NULL, *u = NULL, *b = NULL, *r = NULL, *y = NULL;
  /* y_rank 0: NCHW(c) [1, c, h, w] -> [1, k, oh, ow]; else a GEMM: X of any shape with
     h * w * c elements (rows of c), Y of shape y_shape */
  TRY(float_input(ctx, k, 0, k->y_rank ? NULL : x_dims, 4, k->c * k->h * k->w, "X", &x));
  TRY(float_input(ctx, k, 1, NULL, 0, k->u_size, "U", &u));
  if (k->bias) TRY(float_input(ctx, k, 2, NULL, 0, k->bias, "B", &b));
  if (k->residual) TRY(float_input(ctx, k, 3, k->y_rank ? NULL : y_dims, 4,
                                   k->r_size ? k->r_size : k->k * k->oh * k->ow, "R", &r));
  OrtValue* out = NULL;
  TRY(CALL(KERNEL_CONTEXT_GET_OUTPUT, get_output_t)(ctx, 0, k->y_rank ? k->y_shape : y_dims,
                                                      k->y_rank ? (size_t)k->y_rank : 4, &out));
  TRY(CALL(GET_TENSOR_MUTABLE_DATA, mutable_data_t)(out, &y));
  running_context = ctx;
  wpk_ort_failure = NULL;
  k->fn((const float*)x, (const float*)u, (const float*)b, (const float*)r, (float*)y);
  running_context = NULL;
  if (wpk_ort_failure) {
    char message[256];
    snprintf(message, sizeof message, "%%s %%s: %%s", op_names[k->op], k->name,
             wpk_ort_failure);
    return fail(message);
  }
  return NULL;
}

static void op_compute_v1(void* state, OrtKernelContext* ctx) {
  OrtStatus* status = op_compute(state, ctx);
  if (status) CALL(RELEASE_STATUS, release_t)(status);
}

static void op_destroy(void* state) { (void)state; }

static const struct custom_op op_template = {
  %(api_level)d, op_create_v1, op_name, op_provider, op_float, op_inputs, op_float, op_outputs,
  op_compute_v1, op_destroy, op_input_kind, op_output_kind, op_memory, op_one, op_one, op_one,
  op_one, op_create, op_compute, NULL, op_one, op_end_version, NULL, NULL, NULL, NULL};

__attribute__((visibility("default")))
OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  api = base->GetApi(API_LEVEL);
  if (!api) {
    const void* const* oldest = base->GetApi(1);
    return ((create_status_t)oldest[0])(1, "wpk custom operators need ONNX Runtime >= 1.17");
  }
  OrtCustomOpDomain* domain = NULL;  /* kept for the process: sessions may outlive options */
  TRY(CALL(CREATE_CUSTOM_OP_DOMAIN, create_domain_t)("%(domain)s", &domain));
  for (int i = 0; i < OP_COUNT; ++i) {
    ops[i] = op_template;   /* same functions; the op's position in `ops` names it */
    TRY(CALL(CUSTOM_OP_DOMAIN_ADD, domain_add_t)(domain, &ops[i]));
  }
  return CALL(ADD_CUSTOM_OP_DOMAIN, add_domain_t)(options, domain);
}
"""


@dataclass(frozen=True)
class OpKernel:
    """One compiled kernel of a slice: the C function it is compiled as, its custom op type,
    and the shapes its glue checks (X [1, c, h, w], Y [1, k, oh, ow], U and B sizes)."""

    name: str
    op_type: str
    source: str
    x_chw: tuple[int, int, int]
    y_chw: tuple[int, int, int]
    u_size: int
    bias: int                 # bias elements (0: none)
    residual: bool
    threads: int
    y_shape: tuple[int, ...] = ()   # a GEMM's output shape (X: any shape of its size)
    isa: str = "avx512"             # the build it was generated for (ISAS)
    r_size: int = 0                 # R's elements where they are not Y's (attention's bias)


def op_kernel(spec, index: int, isa: str | None = None) -> OpKernel:
    """The kernel for `spec` (a KernelSpec of op "winograd", "nchwc_depthwise",
    "channel_scale", "nchwc_direct" or "direct_gemm") in build `isa` (default: this
    machine's, `library_isa`; "portable" takes PORTABLE_OPS only)."""
    isa = isa or library_isa() or "avx512"
    if spec.op in ROW_OPS:
        return _row_kernel(spec, index, isa)
    if isa == "portable":
        return _portable_kernel(spec, index)
    if spec.op == "channel_scale":
        name = f"wpk_channel_scale_{index}"
        cs = channel_scale.channel_scale_shape(spec.params)
        return OpKernel(name, OP_TYPES[spec.op], channel_scale.lower(cs, name),
                        (cs.c, cs.h, cs.w), (cs.c, cs.h, cs.w), cs.c, 0, False, cs.threads)
    if spec.op in DIRECT_OPS:
        name = f"wpk_direct_{index}"
        d = direct_conv.direct_shape(spec.params)
        groups = _direct_groups(spec)
        return OpKernel(name, OP_TYPES[spec.op], direct_conv.lower(d, groups, name),
                        (d.c, d.h, d.w), (d.k, *d.out_hw),
                        direct_conv.pack_parameters(d, spec.weights["Wt"], groups).size,
                        d.k if "B" in spec.weights else 0, d.residual, d.threads,
                        tuple(spec.params.get("y_shape", ())))
    if spec.op == "nchwc_depthwise":
        name = f"wpk_depthwise_{index}"
        d = depthwise.depthwise_shape(spec.params)
        return OpKernel(name, OP_TYPES[spec.op], depthwise.lower(d, name),
                        (d.x_channels, d.h, d.w), (d.out_channels, *d.out_hw),
                        d.parameter_count, d.c if "B" in spec.weights else 0, d.residual,
                        d.threads)
    name = f"wpk_winograd_{index}"
    s = winograd.winograd_shape(spec.params)
    blocked = s.layout == "nchwc"   # ONNX Runtime pads blocked channels to 16
    c_dim = -(-s.c // 16) * 16 if blocked else s.c
    k_dim = -(-s.k // 16) * 16 if blocked else s.k
    u_size = s.alpha * s.alpha * -(-s.c // 16) * 16 * -(-s.k // 16) * 16
    return OpKernel(name, OP_TYPES["winograd"], winograd.lower(s, name), (c_dim, s.h, s.w),
                    (k_dim, *s.out_hw), u_size, s.k if "B" in spec.weights else 0, s.residual,
                    s.threads)


def _row_kernel(spec, index: int, isa: str) -> OpKernel:
    """A layer normalization, NaN guard or attention kernel: the same source in both builds
    (the layer norm's and attention's through the portable shim, the guard plain C)."""
    y_shape = tuple(spec.params["y_shape"])
    if spec.op == "layer_norm":
        shape = layer_norm.layer_norm_shape(spec.params)
        name = f"wpk_layer_norm_{index}"
        rows = (shape.rows, 1, shape.width)
        return OpKernel(name, OP_TYPES[spec.op], layer_norm.lower(shape, name), rows, rows,
                        2 * shape.width, shape.width if shape.bias else 0, shape.skip,
                        shape.threads, y_shape, isa)
    if spec.op == "attention":
        a = attention_kernel.attention_shape(spec.params)
        name = f"wpk_attention_{index}"
        x_floats = a.s * (3 if a.packed else 1) * a.hidden
        return OpKernel(name, OP_TYPES[spec.op], attention_kernel.lower(a, name),
                        (x_floats, 1, 1), (a.s, 1, a.hidden),
                        3 * a.hidden if a.packed else a.l * a.hidden,
                        0 if a.packed else a.l * a.hidden, a.bias_heads > 0, a.threads,
                        y_shape, isa, a.bias_heads * a.s * a.l)
    shape = nan_guard.nan_guard_shape(spec.params)
    name = f"wpk_nan_guard_{index}"
    return OpKernel(name, OP_TYPES[spec.op], nan_guard.lower(shape, name), (shape.size, 1, 1),
                    (shape.size, 1, 1), 1, 0, False, shape.threads, y_shape, isa)


def _portable_kernel(spec, index: int) -> OpKernel:
    """A PORTABLE_OPS kernel for the build without AVX-512."""
    if spec.op not in PORTABLE_OPS:
        raise WpkError(f"custom operators: {spec.op} kernels need AVX-512 (ONNX Runtime's "
                       f"16-channel NCHWc blocks); the portable build has {PORTABLE_OPS}")
    name = f"wpk_direct_{index}"
    d = direct_conv.direct_shape(spec.params)
    groups = _direct_groups(spec)
    return OpKernel(name, OP_TYPES[spec.op], direct_conv.lower(d, groups, name, portable=True),
                    (d.c, d.h, d.w), (d.k, *d.out_hw),
                    direct_conv.pack_parameters(d, spec.weights["Wt"], groups).size,
                    d.k if "B" in spec.weights else 0, d.residual, d.threads,
                    tuple(spec.params.get("y_shape", ())), "portable")


def op_parameters(spec) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The initializers a kernel reads: U (its packed parameters) and B (bias, or None).
    U is None where the kernel's second input is a tensor of the graph (a channel scale's
    scale, `spec.sources[1]`)."""
    if spec.op == "channel_scale":
        return None, None
    if spec.op == "nan_guard":
        return np.ascontiguousarray(spec.weights["fill"], np.float32), None
    if spec.op == "attention":          # packed: U is the QKV bias; else K and V are tensors
        qkv_bias = spec.weights.get("B")
        return (None if qkv_bias is None else np.ascontiguousarray(qkv_bias, np.float32)), None
    bias = spec.weights.get("B")
    bias = None if bias is None else np.ascontiguousarray(bias, np.float32)
    if spec.op == "layer_norm":
        return np.concatenate([spec.weights["gamma"], spec.weights["beta"]]).astype(
            np.float32), bias
    if spec.op in DIRECT_OPS:
        shape = direct_conv.direct_shape(spec.params)
        return direct_conv.pack_parameters(shape, spec.weights["Wt"], _direct_groups(spec)), \
            bias
    if spec.op == "nchwc_depthwise":
        shape = depthwise.depthwise_shape(spec.params)
        w = spec.weights
        return depthwise.pack_parameters(shape, w["Wd"], w.get("We"), w.get("Be"), w.get("Wp"),
                                         w.get("Bp")), bias
    return winograd.transform_weights(spec.weights["Wt"], spec.params["m"]), bias


def _direct_groups(spec) -> list:
    """The direct kernel's output groups for a spec (kept rows follow its weight's zeros)."""
    return direct_conv.groups_for(direct_conv.direct_shape(spec.params), spec.weights["Wt"])


def glue_source(kernels: list[OpKernel], slots: int) -> str:
    indices = "\n".join(f"#define {key} {value}" for key, value in API_INDEX.items())
    indices += f"\n#define API_LEVEL {API_LEVEL}"
    declarations = "\n".join(
        f"void {k.name}(const float*, const float*, const float*, const float*, float*);"
        for k in kernels)
    op_types = list(OP_TYPES.values())
    rows = [f'  {{"{k.name}", {k.name}, {op_types.index(k.op_type)}, '
            f'{", ".join(map(str, (*k.x_chw, *k.y_chw)))}, {k.u_size}, {k.bias}, '
            f'{int(k.residual)}, {len(k.y_shape)}, '
            f'{{{", ".join(map(str, k.y_shape or (0,)))}}}, {k.r_size}}},' for k in kernels]
    return GLUE % dict(indices=indices, slots=max(1, slots), declarations=declarations,
                       scratch=pool.thread_scratch_source("wpk_ort"),
                       table="\n".join(rows) or "  {0}", domain=DOMAIN, api_level=API_LEVEL,
                       op_names=", ".join(f'"{t}"' for t in op_types))


def build_library(kernels: list[OpKernel], slots: int | None = None) -> Path:
    """Compile the kernels (in parallel, one per core) and the glue, and link them into one
    shared library; kernel i of `kernels` is what attribute kernel=i runs. The kernels'
    build (`OpKernel.isa`, one for all) picks the compiler flags."""
    slots = slots or max((k.threads for k in kernels), default=1)
    isas = {k.isa for k in kernels} or {"avx512"}
    if len(isas) > 1:
        raise WpkError(f"custom operators: one library cannot mix builds {sorted(isas)}")
    flags = [*object_flags(isas.pop()), "-c"]
    sources = [(k.name, k.source) for k in kernels]
    sources.append(("glue", glue_source(kernels, slots)))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(lambda item: build.compile_c(
            item[1], item[0], flags, suffix=".o", libraries=()), sources))
    digest = hashlib.sha256("\0".join(o.name for o in objects).encode()).hexdigest()[:16]
    library = settings.kernel_cache() / f"ort_ops_{digest}.so"
    if not library.exists():
        tmp = library.with_suffix(f".{os.getpid()}.tmp")
        build.run_compiler([build.compiler(), *LINK_FLAGS, *map(str, objects), "-o", str(tmp),
                            "-lm"], "the custom-operator library")
        os.replace(tmp, library)
    return library


AVX512_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
# x86-64-v3's features as /proc/cpuinfo names them (abm: lzcnt)
X86_64_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return frozenset(next((line for line in handle if line.startswith("flags")),
                                  "").split())
    except OSError:
        return frozenset()


def object_flags(isa: str) -> list[str]:
    """The compiler flags of a library's objects in build `isa`."""
    if isa == "avx512":
        return OBJECT_FLAGS
    target = portable_target()
    machine = [f"-march={target}", "-mtune=native"] if target.startswith("x86-64") else []
    return [*(f for f in OBJECT_FLAGS if not f.startswith(("-march=", "-mtune="))), *machine]


def portable_target() -> str:
    """What the portable build compiles for here: x86-64-v3 (AVX2, FMA) where the CPU has
    it, else baseline x86-64; elsewhere the compiler's default for this machine
    (`platform.machine()`, e.g. aarch64)."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return machine
    return "x86-64-v3" if all(f in _cpu_flags() for f in X86_64_V3) else "x86-64"


def library_target(isa: str) -> str:
    """The machines a library of build `isa` made here runs on (an optimized directory
    records it: `target_runs_here`)."""
    return "x86-64-v4" if isa == "avx512" else portable_target()


def target_runs_here(target: str) -> tuple[bool, str]:
    """(True, '') where a library built for `target` (`library_target`) can run here."""
    if target == "x86-64-v4":
        return runs_here()
    if target == "x86-64-v3":
        missing = [f for f in X86_64_V3 if f not in _cpu_flags()]
        if missing:
            return False, f"its custom operators need {', '.join(missing)} (x86-64-v3)"
        return True, ""
    machine = "x86-64" if platform.machine() in ("x86_64", "AMD64") else platform.machine()
    if target != machine:
        return False, f"its custom operators were built for {target}, this is {machine}"
    return True, ""


def portable_runs_here() -> tuple[bool, str]:
    """(True, '') where the portable build can be made and run: a C compiler."""
    import shutil

    if shutil.which(settings.c_compiler()) is None:
        return False, f"custom operators need a C compiler ({settings.c_compiler()})"
    return True, ""


def library_isa() -> str | None:
    """The build this machine's libraries get: "avx512" where `runs_here`, else "portable"
    (PORTABLE_OPS only) where `portable_runs_here`, else None. WPK_KERNEL_ISA
    (`settings.kernel_isa`) may ask for one of them (tests, benchmarks)."""
    wanted = settings.kernel_isa()
    if wanted in ("auto", "avx512") and runs_here()[0]:
        return "avx512"
    if wanted in ("auto", "portable") and portable_runs_here()[0]:
        return "portable"
    return None


@functools.lru_cache(maxsize=1)
def runs_here() -> tuple[bool, str]:
    """(True, '') where a custom-operator library of the "avx512" build can run: x86-64
    with the AVX-512 subsets of x86-64-v4, and ONNX Runtime's NCHWc blocks of 16 channels."""
    ok, why = winograd.supported()
    if not ok:
        return ok, why
    flags = _cpu_flags()
    missing = [f for f in AVX512_V4 if f not in flags]
    if missing:
        return False, f"Winograd custom operators need {', '.join(missing)}"
    block = nchwc_block()
    if block != 16:
        return False, f"ONNX Runtime's NCHWc block here is {block}, the kernels need 16"
    return True, ""


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """Channels per NCHWc block in this ONNX Runtime build (0: no NCHWc): the order
    ReorderInput gives 32 channels of two pixels tells it."""
    import onnxruntime as ort
    from onnx import TensorProto

    node = helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 32, 1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(NCHWC_DOMAIN, 1)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": np.arange(64, dtype=np.float32).reshape(1, 32, 1, 2)})
    except Exception:
        return 0
    flat = out[0].ravel()
    block = 1
    while block < 32 and flat[block] == 2 * block:
        block += 1
    return block


def custom_op_model(model: onnx.ModelProto, specs: list,
                    indices: list[int] | None = None) -> onnx.ModelProto:
    """`model` with each spec's fused nodes replaced by one custom node (its packed parameters
    and bias become initializers, unused initializers are dropped); specs[j] runs as kernel
    indices[j] of the library (default: j)."""
    indices = list(range(len(specs))) if indices is None else indices
    replaced = _replaced_nodes(specs, indices)
    # each kernel runs where its last node was: every input it reads exists by then (a
    # channel scale's scale is computed after the tensor it scales)
    last_node = {}
    for node in model.graph.node:
        if node.name in replaced:
            last_node[replaced[node.name][0]] = node.name
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    emitted = set()
    shaped: dict[str, onnx.ValueInfoProto] = {}
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        hit = replaced.get(node.name)
        if hit is None:
            out.graph.node.append(node)
            continue
        index, spec = hit
        if index in emitted or node.name != last_node[index]:
            continue
        emitted.add(index)
        _append_kernel_node(out, index, spec)
        # the output's shape, stated: ONNX Runtime cannot infer it for a custom op, and
        # without it the memory planner leaves the tensor (and the graph's plan) to run time
        if spec.output not in graph_outputs:
            kernel = op_kernel(spec, index)
            shaped[spec.output] = helper.make_tensor_value_info(
                spec.output, onnx.TensorProto.FLOAT, list(kernel.y_shape) or [1, *kernel.y_chw])
    if len(emitted) != len(specs):
        missing = [s.node for i, s in zip(indices, specs) if i not in emitted]
        raise WpkError(f"custom operators: nodes {missing} are not in the model")
    _finish_custom_op_model(out, shaped)
    return out


def _replaced_nodes(specs: list, indices: list[int]) -> dict[str, tuple[int, Any]]:
    """Node name -> (kernel index, spec) of the kernel that replaces it."""
    replaced: dict[str, tuple[int, Any]] = {}
    for index, spec in zip(indices, specs):
        for name in spec.node.split("+"):
            if name in replaced:
                raise WpkError(f"custom operators: node {name!r} is in two kernels "
                               f"({replaced[name][1].node} and {spec.node})")
            replaced[name] = (index, spec)
    return replaced


def _append_kernel_node(out: onnx.ModelProto, index: int, spec) -> None:
    """Kernel `index`'s custom node and its parameters (as initializers) into `out`."""
    op_type = OP_TYPES[spec.op]
    if spec.op == "attention":
        _append_attention_nodes(out, index, spec)
        return
    u, bias = op_parameters(spec)
    u_name, b_name = f"wpk_kernel_{index}_U", ""
    if u is None:
        u_name = spec.sources[1]
    else:
        out.graph.initializer.append(numpy_helper.from_array(u, u_name))
    if bias is not None:
        b_name = f"wpk_kernel_{index}_B"
        out.graph.initializer.append(numpy_helper.from_array(bias, b_name))
    inputs = [spec.sources[0], u_name, b_name]
    if spec.params.get("residual"):
        inputs.append(spec.sources[-2])
    out.graph.node.append(helper.make_node(op_type, inputs, [spec.output],
                                           name=f"{spec.node}:{op_type}", domain=DOMAIN,
                                           kernel=index))


def _append_attention_nodes(out: onnx.ModelProto, index: int, spec) -> None:
    """An attention site's nodes: where the operator was ONNX Runtime's packed `Attention`,
    its QKV projection as a MatMul of ONNX Runtime's (MLAS runs it as one GEMM) and then the
    kernel, which adds the QKV bias; else the kernel on the Q, K and V tensors. Both are
    named after the site (`profiled_times` adds them up)."""
    name = f"{spec.node}:{OP_TYPES[spec.op]}"
    bias_input = spec.sources[-2]
    if spec.params["packed"]:
        x, weight = spec.sources[0], spec.sources[1]
        qkv = f"wpk_kernel_{index}_qkv"
        out.graph.node.append(helper.make_node("MatMul", [x, weight], [qkv], name=f"{name}:qkv"))
        u_name = f"wpk_kernel_{index}_U"
        out.graph.initializer.append(numpy_helper.from_array(op_parameters(spec)[0], u_name))
        inputs = [qkv, u_name, ""]
    else:
        inputs = list(spec.sources[:3])
    inputs.append(bias_input)
    out.graph.node.append(helper.make_node(OP_TYPES[spec.op], inputs, [spec.output], name=name,
                                           domain=DOMAIN, kernel=index))


def _finish_custom_op_model(out: onnx.ModelProto,
                            shaped: dict[str, onnx.ValueInfoProto]) -> None:
    """The custom nodes' output shapes stated, unused initializers dropped, our domain
    imported."""
    kept_info = [v for v in out.graph.value_info if v.name not in shaped]
    del out.graph.value_info[:]
    out.graph.value_info.extend([*kept_info, *shaped.values()])
    used = {name for node in out.graph.node for name in node.input}
    kept = [init for init in out.graph.initializer if init.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))



def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes of `model` that read each tensor, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _fingerprint(weight: np.ndarray) -> tuple[int, bytes]:
    """What ONNX Runtime's NCHWc reordering keeps of a weight: its nonzero values (it moves
    them and pads with zeros)."""
    values = np.sort(np.asarray(weight, np.float32).ravel())
    values = values[values != 0]
    return values.size, hashlib.sha1(values.tobytes()).digest()


def original_convs(optimized: onnx.ModelProto, model: onnx.ModelProto, consts: dict,
                   shapes: dict) -> dict[str, tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """For each NCHWc Conv of `optimized` (ONNX Runtime's saved graph of `model`) that still
    computes exactly what one Conv of `model` did: that Conv, its weight and its bias (zeros
    where it has none), by NCHWc node name.

    Found by the weights' values, never by initializer names: exporters share one bias
    initializer between Convs (torch de-duplicates the all-zero biases of identity
    BatchNorms), and ONNX Runtime renames the biases it pads. A node whose weights match no
    Conv, or several Convs that differ, or whose bias is not the original's (ONNX Runtime
    folded a Mul, Add or BatchNorm into it) is left out. `consts` and `shapes`: `model`'s
    initializers and static shapes."""
    candidates: dict[tuple[int, bytes], list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in consts and \
                (len(node.input) < 3 or not node.input[2] or node.input[2] in consts):
            candidates.setdefault(_fingerprint(consts[node.input[1]]), []).append(node)
    stored = {i.name: i for i in optimized.graph.initializer}
    found = {}
    for node in optimized.graph.node:
        if node.domain != NCHWC_DOMAIN or node.op_type != "Conv" or node.input[1] not in stored:
            continue
        originals = candidates.get(_fingerprint(numpy_helper.to_array(stored[node.input[1]])),
                                   [])
        matches = []
        for conv in originals:
            weight = consts[conv.input[1]]
            bias = consts[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else \
                np.zeros(weight.shape[0], np.float32)
            if _same_parameters(optimized, node, weight, bias):
                matches.append((conv, weight, bias))
        first = matches[0] if matches else None
        if first and all(np.array_equal(m[1], first[1]) and np.array_equal(m[2], first[2]) and
                         shapes.get(m[0].input[0]) == shapes.get(first[0].input[0])
                         for m in matches):
            found[node.name] = matches[0]
    return found


@dataclass(frozen=True)
class ConvOrigins:
    """`model`'s initializers, static shapes, and the Conv behind each NCHWc Conv of
    `optimized` (`original_convs`): what every NCHWc site finder starts from, made once
    per search (matching weights sorts every Conv weight)."""

    consts: dict
    shapes: dict
    originals: dict

    @classmethod
    def of(cls, optimized: onnx.ModelProto, model: onnx.ModelProto) -> "ConvOrigins":
        from wpk.optimizer.kernels import load_initializers
        from wpk.optimizer.selection import shapes_of

        consts, shapes = load_initializers(model), shapes_of(model)
        return cls(consts, shapes, original_convs(optimized, model, consts, shapes))


def nchwc_sites(optimized: onnx.ModelProto, model: onnx.ModelProto, m: int = 4,
                split: str = "tiles", threads: int | None = None,
                origins: ConvOrigins | None = None) -> list:
    """KernelSpecs (layout "nchwc") for the 3x3 stride-1 NCHWc convolutions of `optimized`,
    ONNX Runtime's own saved graph of `model` at level 'all'.

    Its NCHWc Conv nodes hold the weights reordered; the original weights and input shape
    come from the Conv of `model` they were made from (`original_convs`). A fused Sum input
    is the residual; activation Relu is fused too.
    """
    origins = origins or ConvOrigins.of(optimized, model)
    shapes, originals = origins.shapes, origins.originals
    specs = []
    for node in optimized.graph.node:
        if node.name not in originals or len(node.input) < 3:
            continue
        spec = _nchwc_winograd_site(node, originals[node.name], shapes, m, split, threads)
        if spec is not None:
            specs.append(spec)
    return specs


def _winograd_attributes(attrs: dict) -> bool:
    """Whether an NCHWc Conv's attributes are the Winograd kernel's: 3x3, stride 1,
    undilated, ungrouped, explicit padding, an activation it fuses."""
    return not (list(attrs.get("kernel_shape", [])) != [3, 3] or
                list(attrs.get("strides", [1, 1])) != [1, 1] or
                list(attrs.get("dilations", [1, 1])) != [1, 1] or attrs.get("group", 1) != 1 or
                activations.from_ort_attributes(attrs) is None or
                attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""))


def _nchwc_winograd_site(node: onnx.NodeProto,
                         original: tuple[onnx.NodeProto, np.ndarray, np.ndarray],
                         shapes: dict, m: int, split: str, threads: int | None):
    """The Winograd KernelSpec for NCHWc Conv `node` (`original`: the Conv of the model it
    was made from, its weight and bias), or None where the kernel does not cover it."""
    from wpk.optimizer.kernels import KernelSpec, _pads

    attrs = _attrs(node)
    if not _winograd_attributes(attrs):
        return None
    conv, weight, bias = original
    x_shape = shapes.get(conv.input[0])
    if weight.ndim != 4 or weight.shape[2:] != (3, 3) or x_shape is None or \
            len(x_shape) != 4 or x_shape[0] != 1 or x_shape[1] != weight.shape[1]:
        return None
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        # whole blocks only: with fewer channels ONNX Runtime feeds NCHW (an image) to
        # an NCHWc Conv, and with padded blocks it renames (pads) the bias
        return None
    _, c, h, w = x_shape
    pads = _pads(node, (h, w), (3, 3), (1, 1), (1, 1))
    if min(pads) < 0 or max(pads) > 2 or h + pads[0] + pads[2] < 3 or \
            w + pads[1] + pads[3] < 3:
        return None
    residual = node.input[3] if len(node.input) > 3 and node.input[3] else None
    name = "w_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)
    params = dict(c=c, k=int(weight.shape[0]), h=h, w=w, pads=pads, m=m,
                  relu=activations.from_ort_attributes(attrs),
                  residual=residual is not None, split=split,
                  threads=threads or os.cpu_count() or 1, name=name, layout="nchwc")
    sources = [node.input[0], "weight:Wt", "weight:B"] + ([residual] if residual else []) \
        + [node.output[0]]
    return KernelSpec("winograd", params, sources, node.output[0], node.name,
                      weights={"Wt": weight.astype(np.float32), "B": bias.astype(np.float32)})


def direct_sites(optimized: onnx.ModelProto, model: onnx.ModelProto,
                 threads: int | None = None, origins: ConvOrigins | None = None) -> list:
    """KernelSpecs (op "nchwc_direct") for the ungrouped NCHWc convolutions of `optimized`
    (ONNX Runtime's saved graph of `model` at level 'all') in whole 16-channel blocks, with
    their fused Sum (residual) and activation; original weights as in `nchwc_sites`."""
    origins = origins or ConvOrigins.of(optimized, model)
    shapes, originals = origins.shapes, origins.originals
    specs = []
    for node in optimized.graph.node:
        if node.name in originals and len(node.input) >= 3:
            spec = _direct_site(node, originals[node.name], shapes, threads)
            if spec is not None:
                specs.append(spec)
    return specs


def _direct_site(node: onnx.NodeProto, original: tuple[onnx.NodeProto, np.ndarray, np.ndarray],
                 shapes: dict, threads: int | None):
    """The direct-convolution KernelSpec for NCHWc Conv `node`, or None where the kernel does
    not cover it (groups, dilation, auto_pad, partial blocks, an activation it cannot fuse)."""
    from wpk.optimizer.kernels import KernelSpec, _pads

    attrs = _attrs(node)
    act = activations.from_ort_attributes(attrs)
    conv, weight, bias = original
    x_shape = shapes.get(conv.input[0])
    if act is None or attrs.get("group", 1) != 1 or \
            list(attrs.get("dilations", [1, 1])) != [1, 1] or \
            attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "") or weight.ndim != 4 or \
            x_shape is None or len(x_shape) != 4 or x_shape[0] != 1 or \
            x_shape[1] != weight.shape[1] or weight.shape[0] % 16 or weight.shape[1] % 16:
        return None
    _, c, h, w = x_shape
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    stride = tuple(int(v) for v in attrs.get("strides", [1, 1]))
    pads = _pads(node, (h, w), (kh, kw), stride, (1, 1))
    if min(pads) < 0 or h + pads[0] + pads[2] < kh or w + pads[1] + pads[3] < kw:
        return None
    residual = node.input[3] if len(node.input) > 3 and node.input[3] else None
    name = "d_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)
    params = dict(c=c, k=int(weight.shape[0]), h=h, w=w, kh=kh, kw=kw, stride=stride,
                  pads=pads, act=act, residual=residual is not None,
                  threads=threads or os.cpu_count() or 1, name=name)
    sources = [node.input[0], "weight:Wt", "weight:B"] + ([residual] if residual else []) \
        + [node.output[0]]
    return KernelSpec("nchwc_direct", params, sources, node.output[0], node.name,
                      weights={"Wt": weight.astype(np.float32), "B": bias.astype(np.float32)})


def gemm_sites(offline: onnx.ModelProto, model: onnx.ModelProto,
               threads: int | None = None) -> list:
    """KernelSpecs (op "direct_gemm") for the MatMul and plain Gemm nodes of `offline`
    (ONNX Runtime's saved graph of `model`) with a constant rank-2 weight of whole 16-column
    blocks and a static input, each with the bias Add after a MatMul fused in."""
    from wpk.optimizer.selection import shapes_of

    consts = {i.name: i for i in offline.graph.initializer}
    shapes = {**shapes_of(offline), **shapes_of(model)}
    readers = _readers(offline)
    outputs = {o.name for o in offline.graph.output}
    specs = []
    for node in offline.graph.node:
        spec = _gemm_site(node, consts, shapes, readers, outputs, threads)
        if spec is not None:
            specs.append(spec)
    return specs


def _gemm_weights(node: onnx.NodeProto, consts: dict
                  ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight as (N, K), bias or None) of a MatMul or plain Gemm, or None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or \
            len(node.input) < 2 or node.input[1] not in consts:
        return None
    attrs = _attrs(node)
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or
                                   attrs.get("beta", 1.0) != 1.0):
        return None
    weight = numpy_helper.to_array(consts[node.input[1]])
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    matrix = weight if attrs.get("transB", 0) else weight.T
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        if node.input[2] not in consts:
            return None
        bias = numpy_helper.to_array(consts[node.input[2]])
        if bias.size != matrix.shape[0] or bias.ndim > 1 and bias.shape[0] != 1:
            return None
        bias = bias.reshape(-1)
    return matrix, bias


def _gemm_site(node: onnx.NodeProto, consts: dict, shapes: dict, readers: dict,
               outputs: set, threads: int | None):
    """The direct GEMM KernelSpec for `node` (and its bias Add), or None."""
    from wpk.optimizer.kernels import KernelSpec

    found = _gemm_weights(node, consts)
    x_shape = shapes.get(node.input[0])
    if found is None or not node.name or not x_shape or \
            any(not isinstance(d, int) or d < 1 for d in x_shape):
        return None
    matrix, bias = found
    n, k = matrix.shape
    if n % 16 or x_shape[-1] != k:
        return None
    nodes, output = [node.name], node.output[0]
    after = readers.get(output, [])
    if bias is None and node.op_type == "MatMul" and len(after) == 1 and output not in outputs \
            and after[0].op_type == "Add":
        other = after[0].input[1] if after[0].input[0] == output else after[0].input[0]
        value = numpy_helper.to_array(consts[other]) if other in consts else None
        if value is not None and value.size == n and value.shape[-1] == n:
            bias, output = value.reshape(-1).astype(np.float32), after[0].output[0]
            nodes.append(after[0].name)
    rows = int(np.prod(x_shape[:-1]))
    params = dict(c=k, k=n, h=1, w=rows, kh=1, kw=1, stride=(1, 1), pads=(0, 0, 0, 0), act="",
                  residual=False, threads=threads or os.cpu_count() or 1, layout="rows",
                  y_shape=(*x_shape[:-1], n),
                  name="g_" + "".join(ch if ch.isalnum() else "_" for ch in node.name))
    weights = {"Wt": np.ascontiguousarray(matrix, np.float32).reshape(n, k, 1, 1)}
    if bias is not None:
        weights["B"] = np.ascontiguousarray(bias, np.float32)
    sources = [node.input[0], "weight:Wt"] + (["weight:B"] if bias is not None else []) + \
        [output]
    return KernelSpec("direct_gemm", params, sources, output, "+".join(nodes), weights=weights)


class _NchwcGraph:
    """ONNX Runtime's saved graph `optimized` of `model`, with what the depthwise site finder
    asks of it: the original Conv behind each NCHWc Conv, each tensor's producer and readers,
    and the activations ONNX Runtime fused."""

    def __init__(self, optimized: onnx.ModelProto, model: onnx.ModelProto,
                 origins: ConvOrigins | None = None) -> None:
        origins = origins or ConvOrigins.of(optimized, model)
        self.optimized, self.model = optimized, model
        self.consts, self.shapes, self.originals = origins.consts, origins.shapes, \
            origins.originals
        self.producer = {o: n for n in optimized.graph.node for o in n.output}
        self.readers = _readers(optimized)
        self.consumers = {tensor: len(nodes) for tensor, nodes in self.readers.items()}
        self.graph_outputs = {o.name for o in optimized.graph.output}

    def original(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        return self.originals[node.name][0] if node.name in self.originals else None

    def sole_reader(self, tensor: str) -> onnx.NodeProto | None:
        after = self.readers.get(tensor, [])
        return after[0] if len(after) == 1 and tensor not in self.graph_outputs else None

    def activation_of(self, conv: onnx.NodeProto) -> tuple[str | None, list[onnx.NodeProto]]:
        """The activation after NCHWc `conv` (None: one our kernels do not fuse) and the
        nodes that compute conv + activation: ONNX Runtime's fused one, or the QuickGelu
        node it makes of x * Sigmoid(x) where that alone reads the Conv's output."""
        act = activations.from_ort_attributes(_attrs(conv))
        after = self.sole_reader(conv.output[0])
        if act == "" and after is not None and after.op_type == "QuickGelu" and \
                after.domain == "com.microsoft":
            return activations.swish(_attrs(after).get("alpha", 1.702)), [conv, after]
        return act, [conv]

    def blocked(self, tensor: str) -> bool:
        """Whether `tensor` is produced by an NCHWc node: whole 16-channel blocks."""
        source = self.producer.get(tensor)
        if source is not None and source.op_type == "QuickGelu":   # element-wise: as its input
            return self.blocked(source.input[0])
        return source is not None and source.domain == NCHWC_DOMAIN and \
            source.op_type != "ReorderOutput"     # which gives plain NCHW back

    def expansion(self, tensor: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto], str] | None:
        """(the 1x1 NCHWc Conv, its nodes, activation) computing `tensor` for the depthwise
        Conv alone, or None."""
        source = self.producer.get(tensor)
        if source is not None and source.op_type == "QuickGelu":
            source = self.producer.get(source.input[0])
        if source is None or source.domain != NCHWC_DOMAIN or source.op_type != "Conv" or \
                len(source.input) != 3 or self.original(source) is None:
            return None
        act, nodes = self.activation_of(source)
        if act is None or nodes[-1].output[0] != tensor or self.sole_reader(tensor) is None or \
                not self.blocked(source.input[0]):
            return None
        return source, nodes, act


def depthwise_sites(optimized: onnx.ModelProto, model: onnx.ModelProto, hb: int = 1,
                    threads: int | None = None, project: bool = False,
                    origins: ConvOrigins | None = None) -> list:
    """KernelSpecs (op "nchwc_depthwise") for the depthwise NCHWc convolutions of `optimized`
    (ONNX Runtime's saved graph of `model` at level 'all'), each fused with the 1x1 NCHWc
    expansion convolution that feeds it where that convolution has no other consumer.
    With `project`: only the sites whose depthwise output feeds just a 1x1 projection
    convolution (with ONNX Runtime's fused Sum as the residual), fused with it too: the
    whole inverted residual. A site keeps its `params["name"]` either way.

    As in `nchwc_sites`, the original weights come from `original_convs`.
    """
    graph = _NchwcGraph(optimized, model, origins)
    specs = []
    for node in optimized.graph.node:
        spec = _depthwise_site(graph, node, hb, threads, project)
        if spec is not None:
            specs.append(spec)
    return specs


def _depthwise_site(graph: _NchwcGraph, node: onnx.NodeProto, hb: int, threads: int | None,
                    project: bool):
    """The KernelSpec for NCHWc `node` as in `depthwise_sites`, or None where it is no site."""
    from wpk.optimizer.kernels import KernelSpec

    if node.domain != NCHWC_DOMAIN or node.op_type != "Conv" or len(node.input) != 3:
        return None
    conv = graph.original(node)
    if conv is None:
        return None
    act, dw_nodes = graph.activation_of(node)
    params = _depthwise_params(graph, node, conv, act, hb, threads)
    if params is None:
        return None
    weights = {"Wd": graph.consts[conv.input[1]].astype(np.float32),
               "B": graph.originals[node.name][2].astype(np.float32)}
    names, source = [n.name for n in dw_nodes], node.input[0]
    expanded = _fuse_expansion(graph, node.input[0], params, weights)
    if expanded is not None:
        expansion_names, source = expanded
        names = expansion_names + names
    if params["c"] // 16 % hb:
        return None
    params["name"] = "d_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)
    sources, output = [source, "weight:U", "weight:B"], dw_nodes[-1].output[0]
    if project:
        projection = _projection(graph, dw_nodes[-1], conv)
        if projection is None:
            return None
        output = _fuse_projection(graph, projection, params, weights)
        names.append(projection[0].name)
        sources += [projection[2]] if projection[2] else []
    return KernelSpec("nchwc_depthwise", params, [*sources, output], output, "+".join(names),
                      weights=weights)


def _depthwise_params(graph: _NchwcGraph, node: onnx.NodeProto, conv: onnx.NodeProto,
                      act: str | None, hb: int, threads: int | None) -> dict | None:
    """The kernel parameters of depthwise NCHWc `node` (original `conv`, fused activation
    `act`) before any expansion is fused, or None where our kernel does not cover it."""
    from wpk.optimizer.kernels import _pads

    attrs = _attrs(node)
    weight, x_shape = graph.consts[conv.input[1]], graph.shapes.get(conv.input[0])
    c = int(weight.shape[0])
    kernel = list(attrs.get("kernel_shape", []))
    stride = list(attrs.get("strides", [1, 1]))
    if weight.ndim != 4 or weight.shape[1] != 1 or attrs.get("group", 1) != c or \
            c % 16 or kernel not in ([3, 3], [5, 5]) or stride not in ([1, 1], [2, 2]) or \
            list(attrs.get("dilations", [1, 1])) != [1, 1] or act is None or \
            x_shape is None or len(x_shape) != 4 or x_shape[0] != 1 or x_shape[1] != c or \
            not graph.blocked(node.input[0]):
        return None
    _, _, h, w = x_shape
    pads = _pads(node, (h, w), tuple(kernel), tuple(stride), (1, 1))
    if min(pads) < 0 or max(pads) >= kernel[0]:
        return None
    return dict(c=c, h=h, w=w, cin=0, kernel=kernel[0], stride=stride[0], pads=pads,
                relu=act, relu_expand="", hb=hb, threads=threads or os.cpu_count() or 1)


def _fuse_expansion(graph: _NchwcGraph, tensor: str, params: dict,
                    weights: dict[str, np.ndarray]) -> tuple[list[str], str] | None:
    """Fuses the 1x1 expansion Conv computing `tensor` (the depthwise input) into the site's
    `params` and `weights` where there is one our kernel covers: (the names of its nodes, the
    tensor the fused kernel reads), or None."""
    expand = graph.expansion(tensor)
    if expand is None:
        return None
    e_node, e_nodes, e_act = expand
    e_attrs, we = _attrs(e_node), graph.consts[graph.original(e_node).input[1]]
    if we.ndim == 4 and we.shape[0] == params["c"] and we.shape[2:] == (1, 1) and \
            list(e_attrs.get("kernel_shape", [1, 1])) == [1, 1] and \
            list(e_attrs.get("strides", [1, 1])) == [1, 1] and \
            e_attrs.get("group", 1) == 1 and \
            not any(e_attrs.get("pads", [0, 0, 0, 0])):
        params.update(cin=int(we.shape[1]), relu_expand=e_act)
        weights.update(We=we.astype(np.float32),
                       Be=graph.originals[e_node.name][2].astype(np.float32))
        return [n.name for n in e_nodes], e_node.input[0]
    return None


def _fuse_projection(graph: _NchwcGraph,
                     projection: tuple[onnx.NodeProto, onnx.NodeProto, str | None],
                     params: dict, weights: dict[str, np.ndarray]) -> str:
    """Adds the 1x1 projection (`_projection`'s answer) to the site's `params` and
    `weights`: the tensor the fused kernel now writes."""
    proj_node, proj_conv, residual = projection
    p_attrs = _attrs(proj_node)
    weight_p = graph.consts[proj_conv.input[1]]
    params.update(cout=int(weight_p.shape[0]), residual=residual is not None,
                  relu_project=activations.from_ort_attributes(p_attrs))
    weights["Wp"] = weight_p.astype(np.float32)
    if len(proj_conv.input) > 2 and proj_conv.input[2]:
        weights["Bp"] = graph.consts[proj_conv.input[2]].astype(np.float32)
    return proj_node.output[0]


def channel_scale_sites(optimized: onnx.ModelProto, model: onnx.ModelProto,
                        threads: int | None = None) -> list:
    """KernelSpecs (op "channel_scale") for the broadcast Muls of `optimized` (ONNX Runtime's
    saved graph of `model`) that scale a blocked tensor by a [1, C, 1, 1] one between a
    ReorderOutput and a ReorderInput (a squeeze-excitation block's scaling): the kernel
    reads the blocked tensor, writes the blocked result, and the Mul, the ReorderInput and
    (where nothing else reads its output) the ReorderOutput go."""
    from wpk.optimizer.kernels import KernelSpec
    from wpk.optimizer.selection import shapes_of

    shapes = shapes_of(model)
    producer = {o: n for n in optimized.graph.node for o in n.output}
    readers = _readers(optimized)
    graph_outputs = {o.name for o in optimized.graph.output}

    def reorder(node: onnx.NodeProto | None, op_type: str) -> bool:
        return node is not None and node.domain == NCHWC_DOMAIN and \
            node.op_type == op_type and not _attrs(node).get("channels_last", 0)

    specs = []
    for node in optimized.graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or not reorder(after[0], "ReorderInput") or \
                node.output[0] in graph_outputs:
            continue
        for big, small in (node.input, node.input[::-1]):
            x_shape, s_shape = shapes.get(big), shapes.get(small)
            source = producer.get(big)
            if x_shape is None or s_shape is None or len(x_shape) != 4 or x_shape[0] != 1 or \
                    tuple(s_shape) != (1, x_shape[1], 1, 1) or x_shape[1] % 16 or \
                    not reorder(source, "ReorderOutput"):
                continue
            names = [node.name, after[0].name]
            if len(readers.get(big, [])) == 1 and big not in graph_outputs:
                names.insert(0, source.name)
            _, c, h, w = x_shape
            name = "s_" + "".join(ch if ch.isalnum() else "_" for ch in node.name)
            params = dict(c=c, h=h, w=w, threads=threads or os.cpu_count() or 1, name=name)
            output = after[0].output[0]
            specs.append(KernelSpec("channel_scale", params, [source.input[0], small, output],
                                    output, "+".join(names)))
            break
    return specs


def _same_parameters(optimized: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray,
                     bias: np.ndarray) -> bool:
    """Whether ONNX Runtime's NCHWc `node` still computes with the original `weight` and
    `bias`: its (reordered, padded) weights hold the same values, and its (padded) bias
    starts with the original. False where it folded a following Mul, Add or BatchNorm in."""
    values = {i.name: i for i in optimized.graph.initializer}
    if len(node.input) < 3 or node.input[1] not in values or node.input[2] not in values:
        return False
    stored_w = numpy_helper.to_array(values[node.input[1]]).ravel()
    stored_b = numpy_helper.to_array(values[node.input[2]]).ravel()
    original = weight.ravel()
    if stored_b.size < bias.size or not np.allclose(stored_b[:bias.size], bias.ravel(),
                                                    rtol=1e-6, atol=0) or \
            np.any(stored_b[bias.size:]):
        return False
    return np.allclose(np.sort(stored_w[stored_w != 0]), np.sort(original[original != 0]),
                       rtol=1e-6, atol=0) if stored_w[stored_w != 0].size == \
        original[original != 0].size else False


def _projection(graph: _NchwcGraph, node: onnx.NodeProto, conv: onnx.NodeProto):
    """(ONNX Runtime's NCHWc projection node, its original Conv, residual tensor or None) for
    the depthwise NCHWc `node` (original `conv`), or None where its output feeds anything
    but one 1x1 stride-1 NCHWc Conv. The original projection is the Conv that reads the
    original depthwise output (after its Relu, where there is one): ONNX Runtime renames the
    bias of a projection whose channels it pads, so the bias cannot tell."""
    proj = _nchwc_projection(graph, node)
    if proj is None:
        return None
    original = _original_projection(graph, conv)
    if original is None:
        return None
    proj_conv, weight, bias = original
    if not _same_parameters(graph.optimized, proj, weight, bias):
        return None       # ONNX Runtime folded something (a Mul, an Add) into the projection
    residual = proj.input[3] if len(proj.input) > 3 and proj.input[3] else None
    return proj, proj_conv, residual


def _nchwc_projection(graph: _NchwcGraph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The 1x1 stride-1 NCHWc Conv (with an activation our kernel fuses) that alone reads
    `node`'s output, or None."""
    if graph.consumers.get(node.output[0]) != 1 or node.output[0] in graph.graph_outputs:
        return None
    proj = next((n for n in graph.optimized.graph.node if node.output[0] in n.input), None)
    if proj is None or proj.domain != NCHWC_DOMAIN or proj.op_type != "Conv" or \
            proj.input[0] != node.output[0]:
        return None
    attrs = _attrs(proj)
    if list(attrs.get("kernel_shape", [])) != [1, 1] or \
            list(attrs.get("strides", [1, 1])) != [1, 1] or attrs.get("group", 1) != 1 or \
            any(attrs.get("pads", [0, 0, 0, 0])) or \
            activations.from_ort_attributes(attrs) is None:
        return None
    return proj


def _original_projection(graph: _NchwcGraph, conv: onnx.NodeProto
                         ) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray] | None:
    """(the Conv of the original model that alone reads depthwise `conv`'s output, after
    its activation where it has one; its weight; its bias, zeros where it has none), or None
    where that is no 1x1 Conv with constant parameters."""
    consts = graph.consts
    readers = _readers(graph.model)
    tensor = conv.output[0]
    after = readers.get(tensor, [])
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip", "HardSwish"):  # ReLU6: Clip
        tensor = after[0].output[0]
    convs = [n for n in readers.get(tensor, []) if n.op_type == "Conv"]
    if len(convs) != 1 or len(readers.get(tensor, [])) != 1 or convs[0].input[1] not in consts:
        return None
    weight = consts[convs[0].input[1]]
    c = int(consts[conv.input[1]].shape[0])
    if weight.ndim != 4 or weight.shape[1:] != (c, 1, 1) or \
            (len(convs[0].input) > 2 and convs[0].input[2] and
             convs[0].input[2] not in consts):
        return None
    bias = consts[convs[0].input[2]] if len(convs[0].input) > 2 and convs[0].input[2] else \
        np.zeros(weight.shape[0], np.float32)
    return convs[0], weight, bias
