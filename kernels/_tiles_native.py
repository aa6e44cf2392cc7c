"""A C loop for the CPU tile switch: whole tiles copied / saved and added with software prefetch.

Why C: a switch writes tiles on random cache lines of a weight far larger than the cache, so it is bound by
miss latency, not bandwidth. PyTorch's row ops (``index_copy_`` / ``index_add_``) and an inductor-compiled loop
issue each tile's stores when they reach it and stall on its misses; this loop prefetches the tile ``ahead``
rows later (``__builtin_prefetch`` with write intent), so ~16 tiles' misses are in flight at once. Measured on
the LLaMA-7B layer (one thread, micro-benchmark with the saved buffers preallocated, b = 64): 2.7 ms (row
ops) -> 1.5 ms (one inductor-compiled function, no prefetch) -> 1.2 ms (this loop, no prefetch) -> 0.55 ms.

Built on first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``) into
``$LIGHTNING_PEFT_CACHE`` (default ``~/.cache/lightning_peft``), keyed by the source's hash, and loaded
with ``ctypes``: no Python headers, no torch headers. Where there is no compiler, or it fails, or
``LIGHTNING_PEFT_NATIVE_TILES=0`` is set, :func:`library` returns ``None`` and callers use the PyTorch ops.
The results are the same bits either way (tests compare both paths).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* x86-64: one clone per vector width, picked at load time (no -march=native: the cache may be shared). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LP_CLONES
#endif

/* Prefetch, with write intent, the tile ``ahead`` rows on: ~16 tiles' misses in flight instead of one. */
#define LP_PREFETCH(base, row_bytes)                                                  \
    if (i + ahead < n) {                                                              \
        const char *p_ = (const char *)(base) + t[i + ahead] * (row_bytes);           \
        for (int64_t k_ = 0; k_ < (row_bytes); k_ += 64) __builtin_prefetch(p_ + k_, 1, 3); \
    }

/* The row loops with the row length a constant (unrolled, vectorized) for the tile widths; any other
 * length goes through the generic body. */
#define LP_BY_WIDTH(width, BODY) \
    switch (width) {             \
    case 16: BODY(16); break;    \
    case 32: BODY(32); break;    \
    case 64: BODY(64); break;    \
    case 128: BODY(128); break;  \
    default: BODY(width); break; \
    }

/* w[t[i]] = s[i] for i < n, rows of row_bytes bytes: restore (the saved bits back, any dtype). */
LP_CLONES void lp_tile_copy_in(char *w, const int64_t *t, int64_t n, const char *s, int64_t row_bytes, int64_t ahead) {
#define LP_COPY(RB)                                                   \
    for (int64_t i = 0; i < n; ++i) {                                 \
        LP_PREFETCH(w, RB)                                            \
        memcpy(w + t[i] * (RB), s + i * (RB), (size_t)(RB));           \
    }
    switch (row_bytes) {
    case 32: LP_COPY(32); break;
    case 64: LP_COPY(64); break;
    case 128: LP_COPY(128); break;
    case 256: LP_COPY(256); break;
    default: LP_COPY(row_bytes); break;
    }
#undef LP_COPY
}

/* s[i] = w[t[i]]; w[t[i]] += v[i] (fp32, one rounding): save and add in one pass over each tile. */
LP_CLONES void lp_tile_save_add_f32(float *w, const int64_t *t, int64_t n, const float *v, float *s, int64_t b,
                                    int64_t ahead) {
#define LP_ADD(B)                                                              \
    for (int64_t i = 0; i < n; ++i) {                                          \
        LP_PREFETCH(w, 4 * (B))                                                \
        float x_[B];                                                           \
        float *row = w + t[i] * (B);                                           \
        memcpy(x_, row, 4 * (B)); /* a local copy: no aliasing, kept in registers */ \
        memcpy(s + i * (B), x_, 4 * (B));                                      \
        for (int64_t k = 0; k < (B); ++k) x_[k] += v[i * (B) + k];             \
        memcpy(row, x_, 4 * (B));                                              \
    }
    LP_BY_WIDTH(b, LP_ADD)
#undef LP_ADD
}

/* bf16 bits of a float, round to nearest even; NaN -> 0xffff (as ATen's vectorized fp32 -> bf16 conversion). */
static inline uint16_t lp_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xffff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float lp_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bf16 weight: s[i] = w[t[i]]; w[t[i]] = bf16(float(w) + v) with v fp32 (v_bf16 = 0) or bf16 (v_bf16 = 1). */
LP_CLONES void lp_tile_save_add_bf16(uint16_t *w, const int64_t *t, int64_t n, const void *v, int64_t v_bf16,
                                     uint16_t *s, int64_t b, int64_t ahead) {
#define LP_ADD(B)                                                                          \
    for (int64_t i = 0; i < n; ++i) {                                                      \
        LP_PREFETCH(w, 2 * (B))                                                            \
        uint16_t x_[B];                                                                    \
        uint16_t *row = w + t[i] * (B);                                                    \
        memcpy(x_, row, 2 * (B));                                                          \
        memcpy(s + i * (B), x_, 2 * (B));                                                  \
        for (int64_t k = 0; k < (B); ++k) {                                                \
            float d = v_bf16 ? lp_f32(((const uint16_t *)v)[i * (B) + k]) : ((const float *)v)[i * (B) + k]; \
            x_[k] = lp_bf16(lp_f32(x_[k]) + d);                                            \
        }                                                                                  \
        memcpy(row, x_, 2 * (B));                                                          \
    }
    LP_BY_WIDTH(b, LP_ADD)
#undef LP_ADD
}

/* y[rows[k], t[i] / nb] += dot(x[rows[k], (t[i] % nb) * b + [0, b)], v[i]) for every tile i and row k: a tile
 * delta's share of a linear layer's output (x S^T) for the rows that name it, added into y in place. x (R, in) and
 * y (R, out) row-major; rows in blocks of LP_MM_ROWS so their x stays in cache while the tiles stream by. The dot
 * keeps 16 lane sums (vectorized without reassociating: the same order every call) and adds them up at the end. */
#define LP_MM_ROWS 16
typedef float lp_v16 __attribute__((vector_size(64)));
typedef float lp_v8 __attribute__((vector_size(32)));
typedef float lp_v4 __attribute__((vector_size(16)));
static inline float lp_dot(const float *restrict x, const float *restrict v, int64_t b) {
    lp_v16 acc = {0}, a, c;
    for (int64_t j = 0; j < b; j += 16) {
        memcpy(&a, x + j, sizeof a);
        memcpy(&c, v + j, sizeof c);
        acc += a * c;
    }
    lp_v8 lo, hi;
    memcpy(&lo, &acc, sizeof lo);
    memcpy(&hi, (const char *)&acc + sizeof lo, sizeof hi);
    lo += hi;
    lp_v4 q0, q1;
    memcpy(&q0, &lo, sizeof q0);
    memcpy(&q1, (const char *)&lo + sizeof q0, sizeof q1);
    q0 += q1;
    return (q0[0] + q0[2]) + (q0[1] + q0[3]);
}

LP_CLONES void lp_tile_matmul_f32(const float *restrict x, int64_t in, float *restrict y, int64_t out,
                                  const int64_t *restrict rows, int64_t nr, const int64_t *restrict t, int64_t n,
                                  const float *restrict v, int64_t b) {
    const int64_t nb = in / b;
    /* the tile's row walks up with sorted tiles (no integer division per tile); unsorted ones divide */
#define LP_MM(B)                                                                        \
    for (int64_t k0 = 0; k0 < nr; k0 += LP_MM_ROWS) {                                   \
        const int64_t k1 = k0 + LP_MM_ROWS < nr ? k0 + LP_MM_ROWS : nr;                 \
        int64_t r = 0, first = 0; /* first = r * nb */                                  \
        for (int64_t i = 0; i < n; ++i) {                                               \
            if (t[i] < first) { r = t[i] / nb; first = r * nb; }                        \
            while (t[i] - first >= nb) { ++r; first += nb; }                            \
            const float *xc = x + (t[i] - first) * (B), *vi = v + i * (B);              \
            for (int64_t k = k0; k < k1; ++k)                                           \
                y[rows[k] * out + r] += lp_dot(xc + rows[k] * in, vi, (B));             \
        }                                                                               \
    }
    LP_BY_WIDTH(b, LP_MM)
#undef LP_MM
}
"""

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LIGHTNING_PEFT_NATIVE_TILES", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        return None
    key = hashlib.sha256((_SOURCE + cc).encode()).hexdigest()[:16]
    from lightning_peft.zoo.cache import cache_root

    root = cache_root()
    lib = root / f"tiles_{key}.so"
    try:
        if not lib.exists():
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src, out = Path(tmp) / "tiles.c", Path(tmp) / "tiles.so"
                src.write_text(_SOURCE)
                # no -march=native: the cache may be shared by machines; the loop is bound by misses, not ALUs
                subprocess.run([cc, "-O3", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(out), str(src)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, lib)  # atomic: concurrent builders each land a whole file
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    dll.lp_tile_copy_in.argtypes = [p, p, i64, p, i64, i64]
    dll.lp_tile_save_add_f32.argtypes = [p, p, i64, p, p, i64, i64]
    dll.lp_tile_save_add_bf16.argtypes = [p, p, i64, p, i64, p, i64, i64]
    dll.lp_tile_matmul_f32.argtypes = [p, i64, p, i64, p, i64, p, i64, p, i64]
    for f in (dll.lp_tile_copy_in, dll.lp_tile_save_add_f32, dll.lp_tile_save_add_bf16, dll.lp_tile_matmul_f32):
        f.restype = None
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled loops (built once per process, cached on disk), or ``None`` where they cannot be built."""
    if "lib" in _state:  # built (or refused) already: no lock on the switch path
        return _state["lib"]
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
        return _state["lib"]
