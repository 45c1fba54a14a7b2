// MoE block pieces for chunk-run's CUDA path: router softmax + top-k, token
// permute/unpermute, SwiGLU forward/backward, combine-weight and router
// gradients. Row-major. The residual stream and the router are f32; the
// expert activations are `T` = f32 or bf16 (suffix _f32 / _bf16), computed in
// f32. bf16 is converted bit by bit so that no CUDA header is needed.

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, unsigned long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, unsigned long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, unsigned long long i, float v) { p[i] = v; }
// Round to nearest even, as PyTorch's float -> bfloat16 does; NaN stays NaN.
__device__ __forceinline__ void st(bf16_t* p, unsigned long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

// One thread per token: softmax over `experts` logits in place (probs), then
// the k largest (ties to the lower index) or the `forced` ids, and their
// weights, renormalised when `norm` is set.
extern "C" __global__ void softmax_topk(float* probs, unsigned int* idx, float* w,
                                        const unsigned int* forced, unsigned int tokens,
                                        unsigned int experts, unsigned int k, int norm) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float* p = probs + (unsigned long long)t * experts;
    float mx = -3.402823466e38f;
    for (unsigned int e = 0; e < experts; e++) mx = fmaxf(mx, p[e]);
    float sum = 0.f;
    for (unsigned int e = 0; e < experts; e++) { p[e] = expf(p[e] - mx); sum += p[e]; }
    for (unsigned int e = 0; e < experts; e++) p[e] /= sum;
    unsigned int* id = idx + (unsigned long long)t * k;
    float* wt = w + (unsigned long long)t * k;
    if (forced) {
        for (unsigned int j = 0; j < k; j++) { id[j] = forced[(unsigned long long)t * k + j]; wt[j] = p[id[j]]; }
    } else {
        unsigned int n = 0;
        for (unsigned int e = 0; e < experts; e++) {
            float v = p[e];
            if (n == k && !(v > wt[k - 1])) continue;
            unsigned int pos = (n < k) ? n : k - 1;
            while (pos > 0 && v > wt[pos - 1]) { wt[pos] = wt[pos - 1]; id[pos] = id[pos - 1]; pos--; }
            wt[pos] = v; id[pos] = e;
            if (n < k) n++;
        }
    }
    if (norm) {
        float s = 0.f;
        for (unsigned int j = 0; j < k; j++) s += wt[j];
        for (unsigned int j = 0; j < k; j++) wt[j] /= s;
    }
}

// dst[r, :] = scale · src[rows[r], :], scale = w[slot[r]] when w is given, else 1.
template <typename T>
__device__ void gather_rows(T* dst, const float* src, const unsigned int* rows, const float* w,
                            const unsigned int* slot, unsigned int n_rows, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)n_rows * width) return;
    unsigned int r = (unsigned int)(i / width), c = (unsigned int)(i % width);
    float s = w ? w[slot[r]] : 1.f;
    st(dst, i, s * src[(unsigned long long)rows[r] * width + c]);
}

// y[t0 + t, :] += Σ_j w[(t0 + t)·k + j] · o[inv[t·k + j], :] (w = 1 when not given).
template <typename T>
__device__ void combine_rows(float* y, const T* o, const unsigned int* inv, const float* w,
                             unsigned int t0, unsigned int n_tok, unsigned int k, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned long long)n_tok * width) return;
    unsigned int t = (unsigned int)(i / width), c = (unsigned int)(i % width);
    float acc = 0.f;
    for (unsigned int j = 0; j < k; j++) {
        float s = w ? w[(unsigned long long)(t0 + t) * k + j] : 1.f;
        acc += s * ld(o, (unsigned long long)inv[(unsigned long long)t * k + j] * width + c);
    }
    y[(unsigned long long)(t0 + t) * width + c] += acc;
}

// h = silu(a) · b
template <typename T>
__device__ void swiglu_fwd(T* h, const T* a, const T* b, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float av = ld(a, i);
    float s = 1.f / (1.f + expf(-av));
    st(h, i, av * s * ld(b, i));
}

// da (holding dH on entry) <- dH · b · silu'(a); db <- dH · silu(a)
template <typename T>
__device__ void swiglu_bwd(T* da, T* db, const T* a, const T* b, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float av = ld(a, i), dh = ld(da, i);
    float s = 1.f / (1.f + expf(-av));
    st(db, i, dh * av * s);
    st(da, i, dh * ld(b, i) * s * (1.f + av * (1.f - s)));
}

// dw[slot[r]] = <g[rows[r], :], o[r, :]>: one warp per row.
template <typename T>
__device__ void row_dots(float* dw, const float* g, const T* o, const unsigned int* rows,
                         const unsigned int* slot, unsigned int n_rows, unsigned int width) {
    unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= n_rows) return;
    const float* gr = g + (unsigned long long)rows[warp] * width;
    unsigned long long base = (unsigned long long)warp * width;
    float acc = 0.f;
    for (unsigned int c = lane; c < width; c += 32) acc += gr[c] * ld(o, base + c);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) dw[slot[warp]] = acc;
}

#define MOE_INSTANCES(T, S)                                                                        \
    extern "C" __global__ void gather_rows_##S(T* dst, const float* src, const unsigned int* rows,  \
                                               const float* w, const unsigned int* slot,            \
                                               unsigned int n_rows, unsigned int width) {           \
        gather_rows<T>(dst, src, rows, w, slot, n_rows, width);                                     \
    }                                                                                               \
    extern "C" __global__ void combine_rows_##S(float* y, const T* o, const unsigned int* inv,      \
                                                const float* w, unsigned int t0, unsigned int n_tok, \
                                                unsigned int k, unsigned int width) {               \
        combine_rows<T>(y, o, inv, w, t0, n_tok, k, width);                                         \
    }                                                                                               \
    extern "C" __global__ void swiglu_fwd_##S(T* h, const T* a, const T* b, unsigned long long n) { \
        swiglu_fwd<T>(h, a, b, n);                                                                  \
    }                                                                                               \
    extern "C" __global__ void swiglu_bwd_##S(T* da, T* db, const T* a, const T* b,                \
                                              unsigned long long n) {                               \
        swiglu_bwd<T>(da, db, a, b, n);                                                             \
    }                                                                                               \
    extern "C" __global__ void row_dots_##S(float* dw, const float* g, const T* o,                 \
                                            const unsigned int* rows, const unsigned int* slot,     \
                                            unsigned int n_rows, unsigned int width) {              \
        row_dots<T>(dw, g, o, rows, slot, n_rows, width);                                           \
    }

MOE_INSTANCES(float, f32)
MOE_INSTANCES(bf16_t, bf16)

// Router backward, one thread per token: from the combine-weight gradients
// dw [T,k] to the logit gradients dl [T,E] (written whole). Renormalised
// top-k: ∂p_m = (∂w_m − Σ_j ∂w_j w_j)/Σ p_K on the chosen experts; softmax:
// ∂l = p ⊙ (∂p − ⟨p, ∂p⟩).
extern "C" __global__ void router_bwd(float* dl, const float* probs, const unsigned int* idx,
                                      const float* w, const float* dw, unsigned int tokens,
                                      unsigned int experts, unsigned int k, int norm) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* p = probs + (unsigned long long)t * experts;
    float* d = dl + (unsigned long long)t * experts;
    const unsigned int* id = idx + (unsigned long long)t * k;
    const float* wt = w + (unsigned long long)t * k;
    const float* dwt = dw + (unsigned long long)t * k;
    float sum_p = 0.f, dot = 0.f;
    for (unsigned int j = 0; j < k; j++) { sum_p += p[id[j]]; dot += dwt[j] * wt[j]; }
    for (unsigned int e = 0; e < experts; e++) d[e] = 0.f;
    for (unsigned int j = 0; j < k; j++) d[id[j]] += norm ? (dwt[j] - dot) / sum_p : dwt[j];
    float inner = 0.f;
    for (unsigned int j = 0; j < k; j++) inner += p[id[j]] * d[id[j]];
    for (unsigned int e = 0; e < experts; e++) d[e] = p[e] * (d[e] - inner);
}
