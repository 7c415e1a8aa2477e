// stablelse CUDA kernels: row-wise log-sum-exp, softmax, log_softmax and cross-entropy.
//
// Header-free on purpose: NVRTC has no system headers. The host prepends
//   #define SLSE_T <float|double|slse_bf16|slse_f16>
// and compiles one module per element type for the device's own sm_XX (CUBIN, never PTX).
//
// Numerics follow src/state.rs: a row is summarised by (m, e) with m = max x_i and
// e = sum_i exp(x_i - m) - 1 (the "excess": the total less the contribution of one maximal
// element), so logsumexp = m + log1p(e) keeps tiny terms ([0, -40] gives 4.2e-18, not 0).
// The empty / all -inf state is (-inf, -1); a NaN makes m NaN (max.NaN); m = +inf means the
// sum is infinite. Accumulation is float32 for float32/bfloat16/float16 and float64 for
// float64 inputs.
//
// Layout: rows of `cols` elements, row r of the input at x + r * ldx, output at y + r * ldy,
// unit stride along the row. Vector (16-byte) loads are used where the host says the input
// and output rows are mutually aligned (flag SLSE_VEC); a scalar head/tail covers the rest.
//
// Tiers (the host picks by row length):
//   *_warp      one warp per row (cols <= 1024), 8 rows per 256-thread block;
//   *_block     one block per row;
//   *_partial + *_final   the row is split into chunks, one block each; the partial kernel
//               writes a (m, e, sum x) state per chunk, the final kernel merges the chunk
//               states of its row (same merge rule) and writes its chunk's outputs.

typedef unsigned short slse_u16;
typedef unsigned int slse_u32;
typedef unsigned long long slse_u64;
typedef long long slse_i64;

struct slse_bf16 { slse_u16 bits; };
struct slse_f16 { slse_u16 bits; };

#define SLSE_OP_LSE 0
#define SLSE_OP_SOFTMAX 1
#define SLSE_OP_LOG_SOFTMAX 2
#define SLSE_OP_XENT 3

#define SLSE_VEC 1
#define SLSE_GRAD 2
#define SLSE_TGT64 4
#define SLSE_MEAN 8

// Kernel parameters, one struct passed by value; mirrored by `Params` in src/cuda/mod.rs
// (all fields 8 bytes wide except the trailing four 4-byte ones, so both sides agree).
struct Params {
    const void* x;       // input rows
    void* y;             // output rows; logsumexp: one value per row; cross-entropy: gradient
    const void* tgt;     // cross-entropy targets (int32 or int64)
    float* loss;         // cross-entropy: per-row loss (float32, rows entries)
    void* ws;            // split tier: 4 accumulators (float, or double for float64) per chunk
    const unsigned long long* count;  // cross-entropy mean + gradient: non-ignored targets
    slse_i64 rows;
    slse_i64 cols;
    slse_i64 ldx;
    slse_i64 ldy;
    slse_i64 ignore_index;
    slse_i64 chunk;      // split tier: elements per chunk (a multiple of 8)
    slse_i64 nchunks;    // split tier: chunks per row
    slse_i64 fchunks;    // split tier: blocks per row of the final kernel (nchunks or 1)
    float eps;           // label smoothing
    float z;             // z-loss coefficient
    float scale;         // gradient scale for reduction "sum"/"none" (mean reads count)
    int flags;
};

template <int K> struct IC { static constexpr int value = K; };

// ---- element conversions (PTX cvt; sm_80+) ------------------------------------------------

__device__ __forceinline__ float slse_load(const float* p) { return *p; }
__device__ __forceinline__ double slse_load(const double* p) { return *p; }
__device__ __forceinline__ float slse_load(const slse_bf16* p) {
    return __uint_as_float(((slse_u32)p->bits) << 16);
}
__device__ __forceinline__ float slse_load(const slse_f16* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
}
__device__ __forceinline__ void slse_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void slse_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void slse_store(slse_bf16* p, float v) {
    slse_u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}
__device__ __forceinline__ void slse_store(slse_f16* p, float v) {
    slse_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

// 16-byte vectors: N elements of T.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ void vload(const float* p, float* v) {
    float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
__device__ __forceinline__ void vload(const double* p, double* v) {
    double2 a = *reinterpret_cast<const double2*>(p);
    v[0] = a.x; v[1] = a.y;
}
__device__ __forceinline__ void unpack16(slse_u32 w, const slse_bf16*, float* v) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack16(slse_u32 w, const slse_f16*, float* v) {
    slse_u16 lo = (slse_u16)(w & 0xffffu), hi = (slse_u16)(w >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(v[0]) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;" : "=f"(v[1]) : "h"(hi));
}
template <typename H>
__device__ __forceinline__ void vload(const H* p, float* v) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    unpack16(a.x, p, v);
    unpack16(a.y, p, v + 2);
    unpack16(a.z, p, v + 4);
    unpack16(a.w, p, v + 6);
}
__device__ __forceinline__ void vstore(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void vstore(double* p, const double* v) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}
__device__ __forceinline__ slse_u32 pack16(const slse_bf16*, float a, float b) {
    slse_u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
__device__ __forceinline__ slse_u32 pack16(const slse_f16*, float a, float b) {
    slse_u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}
template <typename H>
__device__ __forceinline__ void vstore(H* p, const float* v) {
    uint4 a;
    a.x = pack16(p, v[0], v[1]);
    a.y = pack16(p, v[2], v[3]);
    a.z = pack16(p, v[4], v[5]);
    a.w = pack16(p, v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = a;
}

// ---- exp / max ---------------------------------------------------------------------------

__device__ __forceinline__ float slse_ninf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double slse_ninf(double) { return __longlong_as_double(0xfff0000000000000ll); }
__device__ __forceinline__ float slse_pinf(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double slse_pinf(double) { return __longlong_as_double(0x7ff0000000000000ll); }
__device__ __forceinline__ float slse_nan(float) { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ double slse_nan(double) { return __longlong_as_double(0x7ff8000000000000ll); }

// exp(d) for d <= 0 (or NaN) through ex2.approx with the rounding error of d*log2(e) fed back
// to first order: the result is within a few float32 ULPs over the whole range, subnormal
// results included (ex2.approx without .ftz keeps them), exp(-inf) = +0, exp(NaN) = NaN.
__device__ __forceinline__ float slse_exp(float d) {
    const float L2E_HI = 1.44269502162933349609375f;      // float(log2(e))
    const float L2E_LO = 1.925963033500011079e-8f;       // log2(e) - L2E_HI
    float t = d * L2E_HI;
    float c = fmaf(d, L2E_HI, -t);
    c = fmaf(d, L2E_LO, c);
    float y;
    asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(t));
    // c is NaN for d = -inf (inf - inf); y is 0 there, so keep y.
    return (t == slse_ninf(0.f)) ? y : fmaf(y, c * 0.6931471805599453f, y);
}
__device__ __forceinline__ double slse_exp(double d) { return exp(d); }

// exp(x - m) for the per-element hot loops, by input type. `m2` is m * log2(e).
//  - float32: the rounding error of (x - m) * log2(e) is fed back to first order (within a few
//    ULPs); d is clamped at -200 so -inf (and NaN, which only occurs when m is NaN or +inf and
//    the row's result is decided by m) cannot reach the correction; results below FLT_MIN
//    flush to zero (ex2.approx.ftz).
//  - bfloat16 / float16: one FFMA and one ex2 in the log2 domain; the error (about
//    |m| * 2^-24 relative) is far below a 16-bit ULP for any |x| < 1e4.
//  - float64: exp.
template <typename T> struct ElemExp {
    static __device__ __forceinline__ float run(float x, float m, float) {
        const float L2E_HI = 1.44269502162933349609375f;
        const float L2E_LO = 1.925963033500011079e-8f;
        float d = fmaxf(x - m, -200.f);
        float t = d * L2E_HI;
        float c = fmaf(d, L2E_HI, -t);
        c = fmaf(d, L2E_LO, c);
        float y;
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
        return fmaf(y, c * 0.6931471805599453f, y);
    }
};
template <> struct ElemExp<double> {
    static __device__ __forceinline__ double run(double x, double m, double) { return exp(x - m); }
};
__device__ __forceinline__ float slse_exp2_fast(float x, float m2) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(fmaf(x, 1.44269504088896341f, -m2)));
    return y;
}
template <> struct ElemExp<slse_bf16> {
    static __device__ __forceinline__ float run(float x, float, float m2) { return slse_exp2_fast(x, m2); }
};
template <> struct ElemExp<slse_f16> {
    static __device__ __forceinline__ float run(float x, float, float m2) { return slse_exp2_fast(x, m2); }
};

__device__ __forceinline__ float slse_maxnan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ double slse_maxnan(double a, double b) {
    return (a != a || b != b) ? slse_nan(a) : fmax(a, b);
}
__device__ __forceinline__ float slse_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double slse_log1p(double v) { return log1p(v); }

// ---- the (m, e) state ----------------------------------------------------------------------

template <typename A> struct State {
    A m, e, sx;  // max, excess, sum of x (cross-entropy label smoothing)
};

template <typename A> __device__ __forceinline__ State<A> state_empty() {
    State<A> s;
    s.m = slse_ninf(A(0));
    s.e = A(-1);
    s.sx = A(0);
    return s;
}

// One thread's accumulator: the total is cnt + e, where cnt counts the elements equal to the
// running max m (each contributes exactly 1) and e sums the others, so no 1 ever swallows a tiny
// term; it becomes a State with excess e + (cnt - 1).
template <typename A> struct Lane {
    A m, m2, e, cnt, sx;
};

template <typename A> __device__ __forceinline__ Lane<A> lane_empty() {
    Lane<A> l;
    l.m = slse_ninf(A(0));
    l.m2 = l.m;
    l.e = A(0);
    l.cnt = A(0);
    l.sx = A(0);
    return l;
}

template <typename A> __device__ __forceinline__ State<A> lane_state(const Lane<A>& l) {
    State<A> s;
    s.m = l.m;
    s.e = l.e + (l.cnt - A(1));
    s.sx = l.sx;
    return s;
}

// float32 / float64 inputs keep every term (exact excess); 16-bit inputs take the cheaper sum.
template <typename T> struct Wide { static constexpr bool value = true; };
template <> struct Wide<slse_bf16> { static constexpr bool value = false; };
template <> struct Wide<slse_f16> { static constexpr bool value = false; };

// Adds K values: a new maximum rescales the old total.
template <typename T, int K, bool SX, typename A>
__device__ __forceinline__ void lane_push(Lane<A>& l, const A* v) {
    A vm = v[0];
#pragma unroll
    for (int i = 1; i < K; i++) vm = slse_maxnan(vm, v[i]);
    if (SX) {
#pragma unroll
        for (int i = 0; i < K; i++) l.sx += v[i];
    }
    if (vm == slse_ninf(A(0))) return;
    A mn = slse_maxnan(l.m, vm);
    if (!(mn == l.m)) {
        l.e = (l.e + l.cnt) * slse_exp(l.m - mn);
        l.cnt = A(0);
        l.m = mn;
        l.m2 = mn * A(1.4426950408889634);
    }
    if (Wide<T>::value) {
#pragma unroll
        for (int i = 0; i < K; i++) {
            A ev = ElemExp<T>::run(v[i], l.m, l.m2);
            bool tie = v[i] == l.m;
            l.e += tie ? A(0) : ev;
            l.cnt += tie ? A(1) : A(0);
        }
    } else {
        // 16-bit inputs: the maxima's 1s are summed with the rest and one is taken off at the
        // end (cnt stays 0, see lane_state); terms under 2^-24 of the total are lost, which
        // moves a 16-bit result by less than 2^-24 absolute.
#pragma unroll
        for (int i = 0; i < K; i++) l.e += ElemExp<T>::run(v[i], l.m, l.m2);
    }
}

template <typename A>
__device__ __forceinline__ State<A> state_merge(State<A> a, State<A> b) {
    State<A> r;
    r.sx = a.sx + b.sx;
    if (a.m != a.m || b.m != b.m) {
        r.m = slse_nan(A(0));
        r.e = r.m;
        return r;
    }
    State<A> hi = a.m >= b.m ? a : b;
    State<A> lo = a.m >= b.m ? b : a;
    r.m = hi.m;
    if (lo.m == slse_ninf(A(0)) || hi.m == slse_pinf(A(0))) {
        r.e = hi.e;
    } else {
        r.e = hi.e + (A(1) + lo.e) * slse_exp(lo.m - hi.m);
    }
    return r;
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

template <typename A> __device__ __forceinline__ State<A> warp_merge(State<A> s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        State<A> t;
        t.m = shfl_xor(s.m, o);
        t.e = shfl_xor(s.e, o);
        t.sx = shfl_xor(s.sx, o);
        s = state_merge(s, t);
    }
    return s;
}

// Block-wide merge; every thread gets the result. `sh` holds 32 states.
template <typename A> __device__ __forceinline__ State<A> block_merge(State<A> s, State<A>* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    s = warp_merge(s);
    __syncthreads();  // sh may still be read from a previous merge
    if (lane == 0) sh[warp] = s;
    __syncthreads();
    s = lane < nw ? sh[lane] : state_empty<A>();
    s = warp_merge(s);
    return s;
}

// ---- traversal of a row range: scalar head, 16-byte vectors, scalar tail ------------------

template <typename T, typename F>
__device__ __forceinline__ void visit(const T* __restrict__ row, slse_i64 b, slse_i64 e, int tid,
                                      int nthr, bool vec, F&& f) {
    constexpr int N = Vec<T>::N;
    typedef typename Acc<T>::type A;
    slse_i64 vb = e, ve = e;
    if (vec) {
        slse_u64 addr = (slse_u64)(row + b);
        slse_i64 head = (slse_i64)(((16 - (addr & 15)) & 15) / sizeof(T));
        vb = b + head < e ? b + head : e;
        ve = vb + ((e - vb) / N) * N;
    }
    for (slse_i64 j = b + tid; j < vb; j += nthr) {
        A v[1];
        v[0] = slse_load(row + j);
        f(IC<1>(), v, j);
    }
    // U independent 16-byte loads in flight per thread before any arithmetic: one load at a
    // time leaves HBM latency exposed at the occupancy these kernels run at.
    constexpr int U = 4;
    const slse_i64 step = (slse_i64)nthr * N;
    slse_i64 j = vb + (slse_i64)tid * N;
    for (; j + (U - 1) * step < ve; j += U * step) {
        A v[U][N];
#pragma unroll
        for (int u = 0; u < U; u++) vload(row + j + u * step, v[u]);
#pragma unroll
        for (int u = 0; u < U; u++) f(IC<N>(), v[u], j + u * step);
    }
    for (; j < ve; j += step) {
        A v[N];
        vload(row + j, v);
        f(IC<N>(), v, j);
    }
    for (slse_i64 j = ve + tid; j < e; j += nthr) {
        A v[1];
        v[0] = slse_load(row + j);
        f(IC<1>(), v, j);
    }
}

template <typename T, bool SX>
__device__ __forceinline__ State<typename Acc<T>::type> range_state(const T* row, slse_i64 b, slse_i64 e,
                                                                    int tid, int nthr, bool vec) {
    typedef typename Acc<T>::type A;
    Lane<A> l = lane_empty<A>();
    visit(row, b, e, tid, nthr, vec, [&](auto k, const A* v, slse_i64) {
        lane_push<T, decltype(k)::value, SX>(l, v);
    });
    return lane_state(l);
}

// The per-element outputs of one row, given the row's merged state.
template <int OP, typename T> struct Writer {
    typedef typename Acc<T>::type A;
    A m, m2, l1, inv, nan, pm, off, hit;
    bool finite, ignored, badt;
    slse_i64 t;

    __device__ __forceinline__ Writer(const Params& p, State<A> s, slse_i64 t_, A gscale) {
        t = t_;
        m = s.m;
        finite = s.m > slse_ninf(A(0)) && s.m < slse_pinf(A(0));
        l1 = slse_log1p(s.e);
        inv = A(1) / (A(1) + s.e);
        nan = slse_nan(A(0));
        m2 = s.m * A(1.4426950408889634);
        // cross-entropy gradient: scale * (p_j (1 + 2 z lse) - eps / C - (1 - eps) [j == t])
        A lse = s.m + l1;
        pm = gscale * inv * (A(1) + A(2) * A(p.z) * lse);
        off = gscale * A(p.eps) / A(p.cols);
        hit = gscale * (A(1) - A(p.eps));
        ignored = (OP == SLSE_OP_XENT) && t == p.ignore_index;
        badt = (OP == SLSE_OP_XENT) && !ignored && (t < 0 || t >= p.cols);
    }

    template <int K> __device__ __forceinline__ void apply(const A* v, slse_i64 j, T* out) const {
        A o[K];
        // The target's position in this vector, or -1: one 64-bit compare per vector.
        int ti = (OP == SLSE_OP_XENT && (unsigned long long)(t - j) < (unsigned long long)K) ? (int)(t - j) : -1;
#pragma unroll
        for (int i = 0; i < K; i++) {
            if (OP == SLSE_OP_SOFTMAX) {
                o[i] = finite ? ElemExp<T>::run(v[i], m, m2) * inv : nan;
            } else if (OP == SLSE_OP_LOG_SOFTMAX) {
                // scipy: a +inf maximum gives -inf for the finite entries, NaN for the +inf ones.
                A pinf = slse_pinf(A(0));
                o[i] = finite ? (v[i] - m) - l1
                              : (m == pinf ? (v[i] == pinf ? nan : slse_ninf(A(0))) : nan);
            } else {
                A g = ElemExp<T>::run(v[i], m, m2) * pm - off;
                if (i == ti) g -= hit;
                o[i] = ignored ? A(0) : ((finite && !badt) ? g : nan);
            }
        }
        if (K == 1) {
            slse_store(out + j, o[0]);
        } else {
            vstore(out + j, o);
        }
    }
};

// Writes the outputs of elements [b, e) of one row, re-reading the input.
template <int OP, typename T>
__device__ __forceinline__ void range_write(const Params& p, slse_i64 r, slse_i64 b, slse_i64 e, int tid,
                                           int nthr, State<typename Acc<T>::type> s, slse_i64 t,
                                           typename Acc<T>::type gscale) {
    typedef typename Acc<T>::type A;
    const T* row = (const T*)p.x + r * p.ldx;
    T* out = (T*)p.y + r * p.ldy;
    bool vec = (p.flags & SLSE_VEC) != 0;
    Writer<OP, T> w(p, s, t, gscale);
    visit(row, b, e, tid, nthr, vec, [&](auto k, const A* v, slse_i64 j) {
        w.template apply<decltype(k)::value>(v, j, out);
    });
}

template <typename T> __device__ __forceinline__ slse_i64 load_target(const Params& p, slse_i64 r) {
    if (p.flags & SLSE_TGT64) return ((const slse_i64*)p.tgt)[r];
    return (slse_i64)((const int*)p.tgt)[r];
}

// Per-row epilogue run by one thread: logsumexp value or cross-entropy loss.
template <int OP, typename T>
__device__ __forceinline__ void row_epilogue(const Params& p, slse_i64 r, State<typename Acc<T>::type> s,
                                             slse_i64 t) {
    typedef typename Acc<T>::type A;
    A lse = (s.m > slse_ninf(A(0)) && s.m < slse_pinf(A(0))) ? s.m + slse_log1p(s.e) : s.m;
    if (OP == SLSE_OP_LSE) {
        slse_store((T*)p.y + r, lse);
    } else if (OP == SLSE_OP_XENT) {
        float loss;
        if (t == p.ignore_index) {
            loss = 0.f;
        } else if (t < 0 || t >= p.cols) {
            loss = slse_nan(0.f);
        } else {
            A xt = slse_load((const T*)p.x + r * p.ldx + t);
            A eps = A(p.eps);
            A l = lse - (A(1) - eps) * xt;
            if (eps != A(0)) l -= eps * s.sx / A(p.cols);
            l += A(p.z) * lse * lse;
            loss = (float)l;
        }
        p.loss[r] = loss;
    }
}

template <int OP> __device__ __forceinline__ bool has_pass2(const Params& p) {
    return OP == SLSE_OP_SOFTMAX || OP == SLSE_OP_LOG_SOFTMAX ||
           (OP == SLSE_OP_XENT && (p.flags & SLSE_GRAD));
}

template <int OP, typename T>
__device__ __forceinline__ typename Acc<T>::type grad_scale(const Params& p) {
    typedef typename Acc<T>::type A;
    return p.count ? A(1) / A(*p.count) : A(p.scale);
}

// ---- tier 1: one warp per row --------------------------------------------------------------

template <int OP, typename T> __device__ __forceinline__ void warp_rows(const Params& p) {
    typedef typename Acc<T>::type A;
    int lane = threadIdx.x & 31;
    slse_i64 r = (slse_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= p.rows) return;
    const T* row = (const T*)p.x + r * p.ldx;
    bool vec = (p.flags & SLSE_VEC) != 0;
    State<A> s = (OP == SLSE_OP_XENT && p.eps != 0.f)
                     ? range_state<T, true>(row, 0, p.cols, lane, 32, vec)
                     : range_state<T, false>(row, 0, p.cols, lane, 32, vec);
    s = warp_merge(s);
    slse_i64 t = OP == SLSE_OP_XENT ? load_target<T>(p, r) : -1;
    if (lane == 0) row_epilogue<OP, T>(p, r, s, t);
    if (has_pass2<OP>(p)) range_write<OP, T>(p, r, 0, p.cols, lane, 32, s, t, grad_scale<OP, T>(p));
}

// ---- tier 1b: one warp per row, the row held in registers (rows up to 1024, aligned) ---

template <int OP, typename T> __device__ __forceinline__ void warp_cached_rows(const Params& p) {
    typedef float A;
    constexpr int N = Vec<T>::N;
    constexpr int VPT = 1024 / (32 * N);
    int lane = threadIdx.x & 31;
    slse_i64 r = (slse_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= p.rows) return;
    const T* row = (const T*)p.x + r * p.ldx;
    const slse_i64 nv = p.cols / N;
    bool sx = OP == SLSE_OP_XENT && p.eps != 0.f;
    A v[VPT][N];
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        if (lane + u * 32 < nv) vload(row + (lane + u * 32) * N, v[u]);
    }
    // The last cols % N elements, one per lane.
    const slse_i64 tj = nv * N + lane;
    A tv[1];
    tv[0] = tj < p.cols ? slse_load(row + tj) : A(0);
    Lane<A> l = lane_empty<A>();
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        if (lane + u * 32 < nv) {
            if (sx) {
                lane_push<T, N, true>(l, v[u]);
            } else {
                lane_push<T, N, false>(l, v[u]);
            }
        }
    }
    if (tj < p.cols) {
        if (sx) {
            lane_push<T, 1, true>(l, tv);
        } else {
            lane_push<T, 1, false>(l, tv);
        }
    }
    State<A> s = warp_merge(lane_state(l));
    slse_i64 t = OP == SLSE_OP_XENT ? load_target<T>(p, r) : -1;
    if (lane == 0) row_epilogue<OP, T>(p, r, s, t);
    Writer<OP, T> w(p, s, t, grad_scale<OP, T>(p));
    T* out = (T*)p.y + r * p.ldy;
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        if (lane + u * 32 < nv) w.template apply<N>(v[u], (lane + u * 32) * N, out);
    }
    if (tj < p.cols) w.template apply<1>(tv, tj, out);
}

// ---- tier 2: one block per row -------------------------------------------------------------

template <int OP, typename T> __device__ __forceinline__ void block_rows(const Params& p) {
    typedef typename Acc<T>::type A;
    __shared__ State<A> sh[32];
    slse_i64 r = blockIdx.x;
    const T* row = (const T*)p.x + r * p.ldx;
    bool vec = (p.flags & SLSE_VEC) != 0;
    State<A> s = (OP == SLSE_OP_XENT && p.eps != 0.f)
                     ? range_state<T, true>(row, 0, p.cols, threadIdx.x, blockDim.x, vec)
                     : range_state<T, false>(row, 0, p.cols, threadIdx.x, blockDim.x, vec);
    s = block_merge(s, sh);
    slse_i64 t = OP == SLSE_OP_XENT ? load_target<T>(p, r) : -1;
    if (threadIdx.x == 0) row_epilogue<OP, T>(p, r, s, t);
    if (has_pass2<OP>(p))
        range_write<OP, T>(p, r, 0, p.cols, threadIdx.x, blockDim.x, s, t, grad_scale<OP, T>(p));
}

// ---- tier 3: split rows --------------------------------------------------------------------

template <int OP, typename T> __device__ __forceinline__ void partial_rows(const Params& p) {
    typedef typename Acc<T>::type A;
    __shared__ State<A> sh[32];
    slse_i64 r = (slse_i64)blockIdx.x / p.nchunks, c = (slse_i64)blockIdx.x % p.nchunks;
    slse_i64 b = c * p.chunk, e = b + p.chunk < p.cols ? b + p.chunk : p.cols;
    const T* row = (const T*)p.x + r * p.ldx;
    bool vec = (p.flags & SLSE_VEC) != 0;
    State<A> s = (OP == SLSE_OP_XENT && p.eps != 0.f)
                     ? range_state<T, true>(row, b, e, threadIdx.x, blockDim.x, vec)
                     : range_state<T, false>(row, b, e, threadIdx.x, blockDim.x, vec);
    s = block_merge(s, sh);
    if (threadIdx.x == 0) {
        A* w = (A*)p.ws + (r * p.nchunks + c) * 4;
        w[0] = s.m;
        w[1] = s.e;
        w[2] = s.sx;
    }
}

template <int OP, typename T> __device__ __forceinline__ void final_rows(const Params& p) {
    typedef typename Acc<T>::type A;
    __shared__ State<A> sh[32];
    slse_i64 r = (slse_i64)blockIdx.x / p.fchunks, c = (slse_i64)blockIdx.x % p.fchunks;
    State<A> s = state_empty<A>();
    for (slse_i64 i = threadIdx.x; i < p.nchunks; i += blockDim.x) {
        const A* w = (const A*)p.ws + (r * p.nchunks + i) * 4;
        State<A> q;
        q.m = w[0];
        q.e = w[1];
        q.sx = w[2];
        s = state_merge(s, q);
    }
    s = block_merge(s, sh);
    slse_i64 t = OP == SLSE_OP_XENT ? load_target<T>(p, r) : -1;
    if (threadIdx.x == 0 && c == 0) row_epilogue<OP, T>(p, r, s, t);
    if (has_pass2<OP>(p)) {
        slse_i64 b = c * p.chunk, e = b + p.chunk < p.cols ? b + p.chunk : p.cols;
        range_write<OP, T>(p, r, b, e, threadIdx.x, blockDim.x, s, t, grad_scale<OP, T>(p));
    }
}

// ---- tier 2b / 3b: the row (or a cluster's chunk of it) cached in shared memory ----------
//
// For softmax, log_softmax and the cross-entropy gradient: the first pass keeps what it reads
// in dynamic shared memory (in the input's type) so the second pass never goes back to memory; the
// host uses these kernels only for rows whose start and stride are 16-byte aligned, so every
// chunk starts on a vector boundary. With CS > 1 (sm_90 clusters) CS blocks share a row, each
// caching one chunk, and merge their states through distributed shared memory: the row is
// still read from memory once.

__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// Reads a float from the shared memory of block `rank` of this cluster.
__device__ __forceinline__ float cluster_load(const float* local, unsigned rank) {
#if __CUDA_ARCH__ >= 900
    unsigned a = (unsigned)__cvta_generic_to_shared(local), ra;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
    return v;
#else
    return *local;
#endif
}

template <int OP, typename T, int CS> __device__ __forceinline__ void cached_rows(const Params& p) {
    typedef float A;  // float32 accumulation (the host never sends float64 here)
    constexpr int N = Vec<T>::N;
    extern __shared__ float4 slse_dyn[];
    T* cache = reinterpret_cast<T*>(slse_dyn);  // the chunk as read, in the input's type
    __shared__ State<A> sh[32];
    __shared__ float mine[3];
    slse_i64 r = (slse_i64)blockIdx.x / CS;
    unsigned rank = (unsigned)(blockIdx.x % CS);
    slse_i64 b = (slse_i64)rank * p.chunk;
    slse_i64 e = b + p.chunk < p.cols ? b + p.chunk : p.cols;
    if (b > e) b = e;
    const T* row = (const T*)p.x + r * p.ldx;
    Lane<A> l = lane_empty<A>();
    bool sx = OP == SLSE_OP_XENT && p.eps != 0.f;
    // Aligned rows: visit() has no head, vectors start at b + multiples of N.
    visit(row, b, e, threadIdx.x, blockDim.x, true, [&](auto k, const A* v, slse_i64 j) {
        constexpr int K = decltype(k)::value;
        // Exact: the values came from T.
        if (K == 1) {
            slse_store(cache + (j - b), v[0]);
        } else {
            vstore(cache + (j - b), v);
        }
        if (sx) {
            lane_push<T, K, true>(l, v);
        } else {
            lane_push<T, K, false>(l, v);
        }
    });
    State<A> s = block_merge(lane_state(l), sh);
    if (CS > 1) {
        if (threadIdx.x == 0) {
            mine[0] = s.m;
            mine[1] = s.e;
            mine[2] = s.sx;
        }
        cluster_sync();
        State<A> q = state_empty<A>();
        if (threadIdx.x < CS) {
            q.m = cluster_load(&mine[0], threadIdx.x);
            q.e = cluster_load(&mine[1], threadIdx.x);
            q.sx = cluster_load(&mine[2], threadIdx.x);
        }
        if (threadIdx.x < 32) q = warp_merge(q);
        if (threadIdx.x == 0) sh[0] = q;
        cluster_sync();  // no block leaves while another still reads its `mine`
        __syncthreads();
        s = sh[0];
    } else {
        __syncthreads();  // cache writes visible to every thread of the block
    }
    slse_i64 t = OP == SLSE_OP_XENT ? load_target<T>(p, r) : -1;
    if (threadIdx.x == 0 && rank == 0) row_epilogue<OP, T>(p, r, s, t);
    Writer<OP, T> w(p, s, t, grad_scale<OP, T>(p));
    T* out = (T*)p.y + r * p.ldy;
    slse_i64 ve = b + ((e - b) / N) * N;
    for (slse_i64 j = b + (slse_i64)threadIdx.x * N; j < ve; j += (slse_i64)blockDim.x * N) {
        A v[N];
        vload(cache + (j - b), v);
        w.template apply<N>(v, j, out);
    }
    for (slse_i64 j = ve + threadIdx.x; j < e; j += blockDim.x) {
        A v[1];
        v[0] = slse_load(cache + (j - b));
        w.template apply<1>(v, j, out);
    }
}

// ---- cross-entropy helpers -----------------------------------------------------------------

// count[0] += number of targets != ignore_index (the divisor of reduction "mean"); the host
// zeroes it first.
__device__ __forceinline__ void count_targets(const Params& p) {
    // Integer atomics: exact, so the count is the same whatever the order.
    unsigned long long n = 0;
    for (slse_i64 r = (slse_i64)blockIdx.x * blockDim.x + threadIdx.x; r < p.rows;
         r += (slse_i64)gridDim.x * blockDim.x) {
        slse_i64 t = (p.flags & SLSE_TGT64) ? ((const slse_i64*)p.tgt)[r] : (slse_i64)((const int*)p.tgt)[r];
        n += (t != p.ignore_index) ? 1ull : 0ull;
    }
    for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xffffffffu, n, o);
    if ((threadIdx.x & 31) == 0 && n) atomicAdd((unsigned long long*)p.count, n);
}

// Deterministic reduction of the per-row losses (fixed blocking, fixed order). With p.ws null
// one block reduces all rows into y[0]; otherwise xent_reduce_partial has left (sum, count)
// pairs of p.nchunks blocks of p.chunk rows in p.ws (doubles) and one block adds those.
// y[0] = sum, or for "mean" the sum over the number of targets != ignore_index.
template <typename T> __device__ __forceinline__ void block_sum2(double& a, double& n) {
    __shared__ double sh[32], shn[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        n += __shfl_xor_sync(0xffffffffu, n, o);
    }
    if ((threadIdx.x & 31) == 0) {
        sh[threadIdx.x >> 5] = a;
        shn[threadIdx.x >> 5] = n;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        a = 0;
        n = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) {
            a += sh[i];
            n += shn[i];
        }
    }
}

template <typename T>
__device__ __forceinline__ void sum_rows(const Params& p, slse_i64 b, slse_i64 e, double& acc, double& n) {
    bool mean = (p.flags & SLSE_MEAN) != 0;
    acc = 0;
    n = 0;
    for (slse_i64 r = b + threadIdx.x; r < e; r += blockDim.x) {
        acc += (double)p.loss[r];
        if (mean) n += (load_target<T>(p, r) != p.ignore_index) ? 1.0 : 0.0;
    }
    block_sum2<T>(acc, n);
}

template <typename T> __device__ __forceinline__ void reduce_loss_partial(const Params& p) {
    slse_i64 b = (slse_i64)blockIdx.x * p.chunk;
    slse_i64 e = b + p.chunk < p.rows ? b + p.chunk : p.rows;
    double acc, n;
    sum_rows<T>(p, b, e, acc, n);
    if (threadIdx.x == 0) {
        ((double*)p.ws)[2 * blockIdx.x] = acc;
        ((double*)p.ws)[2 * blockIdx.x + 1] = n;
    }
}

template <typename T> __device__ __forceinline__ void reduce_loss(const Params& p) {
    double acc = 0, n = 0;
    if (p.ws == 0) {
        sum_rows<T>(p, 0, p.rows, acc, n);
    } else {
        for (slse_i64 i = threadIdx.x; i < p.nchunks; i += blockDim.x) {
            acc += ((const double*)p.ws)[2 * i];
            n += ((const double*)p.ws)[2 * i + 1];
        }
        block_sum2<T>(acc, n);
    }
    if (threadIdx.x == 0) {
        double tot = (p.flags & SLSE_MEAN) ? acc / n : acc;
        slse_store((T*)p.y, (typename Acc<T>::type)tot);
    }
}

// reduction "none": y[r] = loss[r] in the logits' dtype.
template <typename T> __device__ __forceinline__ void cast_loss(const Params& p) {
    slse_i64 r = (slse_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r < p.rows) slse_store((T*)p.y + r, (typename Acc<T>::type)p.loss[r]);
}

// ---- entry points --------------------------------------------------------------------------

#ifndef SLSE_T
#define SLSE_T float
#endif

#define SLSE_TIERS(NAME, OP)                                                                \
    extern "C" __global__ void __launch_bounds__(512) NAME##_warp(Params p) {            \
        warp_rows<OP, SLSE_T>(p);                                                           \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(512) NAME##_block(Params p) {           \
        block_rows<OP, SLSE_T>(p);                                                          \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(512) NAME##_partial(Params p) {         \
        partial_rows<OP, SLSE_T>(p);                                                        \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(512) NAME##_final(Params p) {           \
        final_rows<OP, SLSE_T>(p);                                                          \
    }

// Cached tiers: only for the ops with a second pass and 16/32-bit inputs.
#define SLSE_CACHED(NAME, OP)                                                               \
    extern "C" __global__ void __launch_bounds__(512) NAME##_cached(Params p) {           \
        cached_rows<OP, SLSE_T, 1>(p);                                                      \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME##_warpreg(Params p) {          \
        warp_cached_rows<OP, SLSE_T>(p);                                                    \
    }
#if __CUDA_ARCH__ >= 900
#define SLSE_CLUSTER(NAME, OP)                                                              \
    extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(512)           \
        NAME##_cluster8(Params p) {                                                         \
        cached_rows<OP, SLSE_T, 8>(p);                                                      \
    }                                                                                       \
    extern "C" __global__ void __cluster_dims__(16, 1, 1) __launch_bounds__(512)          \
        NAME##_cluster16(Params p) {                                                        \
        cached_rows<OP, SLSE_T, 16>(p);                                                     \
    }
#else
#define SLSE_CLUSTER(NAME, OP)
#endif

#ifndef SLSE_NO_CACHED
SLSE_CACHED(softmax, SLSE_OP_SOFTMAX)
SLSE_CACHED(log_softmax, SLSE_OP_LOG_SOFTMAX)
SLSE_CACHED(xent, SLSE_OP_XENT)
SLSE_CLUSTER(softmax, SLSE_OP_SOFTMAX)
SLSE_CLUSTER(log_softmax, SLSE_OP_LOG_SOFTMAX)
SLSE_CLUSTER(xent, SLSE_OP_XENT)
#endif

SLSE_TIERS(lse, SLSE_OP_LSE)
SLSE_TIERS(softmax, SLSE_OP_SOFTMAX)
SLSE_TIERS(log_softmax, SLSE_OP_LOG_SOFTMAX)
SLSE_TIERS(xent, SLSE_OP_XENT)

extern "C" __global__ void __launch_bounds__(1024) xent_count(Params p) { count_targets(p); }
extern "C" __global__ void __launch_bounds__(1024) xent_reduce(Params p) { reduce_loss<SLSE_T>(p); }
extern "C" __global__ void __launch_bounds__(1024) xent_reduce_partial(Params p) {
    reduce_loss_partial<SLSE_T>(p);
}
extern "C" __global__ void __launch_bounds__(1024) xent_cast(Params p) { cast_loss<SLSE_T>(p); }
