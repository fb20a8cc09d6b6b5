"""One small thread pool shared by every generated kernel of the process (a C library loaded
with RTLD_GLOBAL; kernels call `wpk_pool_run`).

Why not OpenMP: in a segment executor our kernels alternate with ONNX Runtime runs on the same
cores. OpenMP threads either sleep (each kernel then pays the wake-up and runs at the speed of
the slowest thread) or spin (and steal the core from ONNX Runtime's own pool). This pool hands
out work items dynamically (a late thread takes fewer items, so nobody waits for it), spins only
briefly after a job, then sleeps on a futex; ONNX Runtime sessions of a mixed slice stop
spinning at the end of each run (`session.force_spinning_stop`), so the two pools take turns.
"""
from __future__ import annotations

import ctypes
import functools
import os

from wpk import settings

# Per-thread scratch for generated kernels (freed when the thread ends: ONNX Runtime's pool
# threads end with their session) and a way for a kernel to report failure to its caller.
# Included by this pool and by the custom-operator glue (`ort_ops.py`), under PREFIX.
THREAD_SCRATCH = r"""
#include <pthread.h>
#include <stdlib.h>
struct PREFIX_scratch { size_t floats; float* data; };
static pthread_key_t PREFIX_scratch_key;
static pthread_once_t PREFIX_scratch_once = PTHREAD_ONCE_INIT;
static __thread const char* PREFIX_failure;
static void PREFIX_scratch_free(void* p) {
  struct PREFIX_scratch* s = (struct PREFIX_scratch*)p;
  free(s->data);
  free(s);
}
static int PREFIX_scratch_ready;
static void PREFIX_scratch_key_init(void) {
  PREFIX_scratch_ready = pthread_key_create(&PREFIX_scratch_key, PREFIX_scratch_free) == 0;
}
/* The library is being unloaded (ONNX Runtime unloads a custom-op library with the last
   session using it; its pool threads have ended, their buffers are freed): free the
   unloading thread's buffer and give the key back, so reloading leaks nothing. */
__attribute__((destructor)) static void PREFIX_scratch_unload(void) {
  if (!PREFIX_scratch_ready) return;
  void* mine = pthread_getspecific(PREFIX_scratch_key);
  if (mine) PREFIX_scratch_free(mine);
  pthread_key_delete(PREFIX_scratch_key);
  PREFIX_scratch_ready = 0;
}
/* this thread's buffer of at least `floats` floats, 64-byte aligned (NULL: out of memory) */
float* PREFIX_thread_scratch(size_t floats) {
  pthread_once(&PREFIX_scratch_once, PREFIX_scratch_key_init);
  if (!PREFIX_scratch_ready) return NULL;
  struct PREFIX_scratch* s = (struct PREFIX_scratch*)pthread_getspecific(PREFIX_scratch_key);
  if (!s) {
    s = (struct PREFIX_scratch*)calloc(1, sizeof *s);
    if (!s || pthread_setspecific(PREFIX_scratch_key, s)) { free(s); return NULL; }
  }
  if (s->floats < floats) {
    free(s->data);
    s->data = (float*)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    s->floats = s->data ? floats : 0;
  }
  return s->data;
}
/* a kernel, on its caller's thread: the call failed, and why (a static string) */
void PREFIX_kernel_failed(const char* why) { PREFIX_failure = why; }
"""


def thread_scratch_source(prefix: str) -> str:
    return THREAD_SCRATCH.replace("PREFIX", prefix)


POOL_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <x86intrin.h>

typedef void (*wpk_item_fn)(int item, int slot, void* ctx);

/* state word: seq (20 bits) | total (22 bits) | next (22 bits) */
#define NEXT_BITS 22
#define MASK ((1ull << NEXT_BITS) - 1)
static _Atomic unsigned long long state = 0;
static _Atomic int done = 0;
static _Atomic int published = 0;      /* futex word */
static _Atomic int sleeping = 0;
static wpk_item_fn job_fn;
static void* job_ctx;
static unsigned seq = 0;
static int workers = 0;
static unsigned long long spin_cycles = 60000;   /* ~25 us at 2.3 GHz TSC */
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int claim(void) {
  unsigned long long s = atomic_load(&state);
  for (;;) {
    unsigned long long next = s & MASK, total = (s >> NEXT_BITS) & MASK;
    if (next >= total) return -1;
    if (atomic_compare_exchange_weak(&state, &s, s + 1)) return (int)next;
  }
}

static int claimable(void) {
  unsigned long long s = atomic_load(&state);
  return (s & MASK) < ((s >> NEXT_BITS) & MASK);
}

static void* worker_main(void* arg) {
  const int slot = (int)(long)arg;
  for (;;) {
    int item;
    while ((item = claim()) >= 0) {
      job_fn(item, slot, job_ctx);
      atomic_fetch_add(&done, 1);
    }
    const unsigned long long start = __rdtsc();
    int found = 0;
    while (__rdtsc() - start < spin_cycles) {
      if (claimable()) { found = 1; break; }
      _mm_pause();
    }
    if (found) continue;
    const int last = atomic_load(&published);
    atomic_fetch_add(&sleeping, 1);
    if (!claimable()) syscall(SYS_futex, &published, FUTEX_WAIT_PRIVATE, last, 0, 0, 0);
    atomic_fetch_sub(&sleeping, 1);
  }
  return 0;
}

static int pin = 0;

static void start_workers(void) {
  for (int i = 0; i < workers; ++i) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8 << 20);
    if (pin) {  /* worker i on logical CPU i + 1 (the caller keeps the others) */
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(i + 1, &set);
      pthread_attr_setaffinity_np(&attr, sizeof(set), &set);
    }
    pthread_create(&thread, &attr, worker_main, (void*)(long)(i + 1));
    pthread_detach(thread);
    pthread_attr_destroy(&attr);
  }
}

void wpk_pool_configure(int threads, long spin_us, int pin_workers) {
  pin = pin_workers;
  if (workers == 0 && threads > 1) workers = threads - 1;
  if (spin_us >= 0) spin_cycles = (unsigned long long)spin_us * 2300ull;
}

int wpk_pool_slots(void) { return workers + 1; }

/* Run items 0..total-1 of fn on the caller (slot 0) and the workers (slots 1..); returns
   when all are done. One job at a time: concurrent callers queue on a mutex. */
void wpk_pool_run(wpk_item_fn fn, void* ctx, int total) {
  if (total <= 0) return;
  pthread_mutex_lock(&run_lock);
  if (workers > 0) pthread_once(&once, start_workers);
  job_fn = fn;
  job_ctx = ctx;
  atomic_store(&done, 0);
  seq = (seq + 1) & 0xFFFFF;
  atomic_store(&state, ((unsigned long long)seq << (2 * NEXT_BITS)) |
                       ((unsigned long long)total << NEXT_BITS));
  atomic_fetch_add(&published, 1);
  if (atomic_load(&sleeping)) syscall(SYS_futex, &published, FUTEX_WAKE_PRIVATE, workers, 0, 0, 0);
  int item;
  while ((item = claim()) >= 0) {
    fn(item, 0, ctx);
    atomic_fetch_add(&done, 1);
  }
  while (atomic_load(&done) < total) _mm_pause();
  pthread_mutex_unlock(&run_lock);
}
"""



@functools.lru_cache(maxsize=1)
def load_pool(threads: int | None = None) -> ctypes.CDLL:
    """Compile (once, cached) and load the pool globally, before any kernel that uses it."""
    from wpk.optimizer.build import compile_c

    path = compile_c(POOL_SOURCE + thread_scratch_source("wpk"), "wpk_pool")
    library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    library.wpk_pool_configure(ctypes.c_int(threads or os.cpu_count() or 1),
                               ctypes.c_long(settings.pool_spin_us()),
                               ctypes.c_int(int(settings.pool_pin())))
    return library
