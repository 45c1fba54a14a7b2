// MoE block pieces for chunk-run's CUDA path: router softmax + top-k,
// token permute/unpermute, SwiGLU forward/backward. Row-major f32.

// One thread per token: softmax over `experts` logits in place (probs),
// then the k largest (ties to the lower index) and their weights,
// renormalised when `norm` is set. k <= 16.
extern "C" __global__ void softmax_topk(float* probs, unsigned int* idx, float* w,
                                        unsigned int tokens, unsigned int experts,
                                        unsigned int k, int norm) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float* p = probs + (unsigned long long)t * experts;
    float mx = -3.402823466e38f;
    for (unsigned int e = 0; e < experts; e++) mx = fmaxf(mx, p[e]);
    float sum = 0.f;
    for (unsigned int e = 0; e < experts; e++) { p[e] = __expf(p[e] - mx); sum += p[e]; }
    for (unsigned int e = 0; e < experts; e++) p[e] /= sum;
    unsigned int* id = idx + (unsigned long long)t * k;
    float* wt = w + (unsigned long long)t * k;
    unsigned int n = 0;
    for (unsigned int e = 0; e < experts; e++) {
        float v = p[e];
        if (n == k && !(v > wt[k - 1])) continue;
        unsigned int pos = (n < k) ? n : k - 1;
        while (pos > 0 && v > wt[pos - 1]) { wt[pos] = wt[pos - 1]; id[pos] = id[pos - 1]; pos--; }
        wt[pos] = v; id[pos] = e;
        if (n < k) n++;
    }
    if (norm) {
        float s = 0.f;
        for (unsigned int j = 0; j < k; j++) s += wt[j];
        for (unsigned int j = 0; j < k; j++) wt[j] /= s;
    }
}

// dst[r, :] = src[rows[r], :]
extern "C" __global__ void gather_rows(float* dst, const float* src, const unsigned int* rows,
                                       unsigned int n_rows, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long total = (unsigned long long)n_rows * width;
    if (i >= total) return;
    unsigned int r = (unsigned int)(i / width), c = (unsigned int)(i % width);
    dst[i] = src[(unsigned long long)rows[r] * width + c];
}

// y[t, :] += sum_j w[t, j] * o[inv[t, j], :] for tokens t0 .. t0 + n_tok
extern "C" __global__ void combine_rows(float* y, const float* o, const unsigned int* inv,
                                        const float* w, unsigned int t0, unsigned int n_tok,
                                        unsigned int k, unsigned int width) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long total = (unsigned long long)n_tok * width;
    if (i >= total) return;
    unsigned int t = (unsigned int)(i / width), c = (unsigned int)(i % width);
    float acc = 0.f;
    for (unsigned int j = 0; j < k; j++)
        acc += w[(unsigned long long)(t0 + t) * k + j] * o[(unsigned long long)inv[(unsigned long long)t * k + j] * width + c];
    y[(unsigned long long)(t0 + t) * width + c] += acc;
}

// h = silu(a) * b
extern "C" __global__ void swiglu_fwd(float* h, const float* a, const float* b, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 1.f / (1.f + __expf(-a[i]));
    h[i] = a[i] * s * b[i];
}

// da (holding dH on entry) <- dH * b * silu'(a); db <- dH * silu(a)
extern "C" __global__ void swiglu_bwd(float* da, float* db, const float* a, const float* b, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float av = a[i], dh = da[i];
    float s = 1.f / (1.f + __expf(-av));
    db[i] = dh * av * s;
    da[i] = dh * b[i] * s * (1.f + av * (1.f - s));
}
