// Expert-id histogram: each block counts into a shared-memory copy of the
// histogram (privatised atomics, so hot experts contend only inside a
// block), then adds it to the global one. Out-of-range ids are counted in
// `bad` (the host reports the first one from its own scan).
// No host headers: compiled at run time by NVRTC.

#define HIST_KERNEL(NAME, T)                                                       \
extern "C" __global__ void NAME(const T* ids, unsigned long long n,                \
                                unsigned int experts,                              \
                                unsigned long long* hist,                          \
                                unsigned long long* bad) {                         \
    extern __shared__ unsigned int local[];                                        \
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) local[e] = 0; \
    __syncthreads();                                                               \
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;        \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x        \
             + threadIdx.x; i < n; i += stride) {                                  \
        long long v = (long long)ids[i];                                           \
        if (v >= 0 && v < (long long)experts) {                                    \
            atomicAdd(&local[v], 1u);                                              \
        } else {                                                                   \
            atomicAdd(bad, 1ull);                                                  \
        }                                                                          \
    }                                                                              \
    __syncthreads();                                                               \
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {             \
        if (local[e]) atomicAdd(&hist[e], (unsigned long long)local[e]);           \
    }                                                                              \
}

HIST_KERNEL(hist_i32, int)
HIST_KERNEL(hist_i64, long long)
HIST_KERNEL(hist_u8, unsigned char)
HIST_KERNEL(hist_i16, short)
