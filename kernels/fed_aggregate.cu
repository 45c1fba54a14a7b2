// Weighted accumulation of client tensors into an f64 accumulator:
// acc[i] += w * x[i], for f32, f16 and bf16 inputs. The product and the sum
// are rounded separately (__dmul_rn, __dadd_rn: never fused into an FMA), as
// the CPU path computes them, so both give the same bits. Half conversions are
// written out bit by bit so no CUDA header is needed.

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    unsigned int sign = (h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    unsigned int bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            bits = sign | ((unsigned int)(112 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return __uint_as_float(bits);
}

extern "C" __global__ void axpy_f32(double* acc, const float* x, double w, unsigned long long n) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] = __dadd_rn(acc[i], __dmul_rn(w, (double)x[i]));
}

extern "C" __global__ void axpy_bf16(double* acc, const unsigned short* x, double w, unsigned long long n) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] = __dadd_rn(acc[i], __dmul_rn(w, (double)bf16_to_f32(x[i])));
}

extern "C" __global__ void axpy_f16(double* acc, const unsigned short* x, double w, unsigned long long n) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        acc[i] = __dadd_rn(acc[i], __dmul_rn(w, (double)f16_to_f32(x[i])));
}

// out[i] = acc[i] / w rounded to f32 (the weighted mean), rounded as the CPU
// pass rounds it: an IEEE division, then round to nearest even.
extern "C" __global__ void mean_to_f32(float* out, const double* acc, double w, unsigned long long n) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __double2float_rn(__ddiv_rn(acc[i], w));
}
