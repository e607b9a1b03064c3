// runtime.cu: the CUDA backend's process side: setup (is a device there, and can this binary
// run on it), memory (managed, so the host reads the model makes keep working), copies,
// the end-of-op synchronisation, scratch and the staging of host arguments, the peak.
//
// Deliberately not here yet: streams other than the default one, CUDA graphs, pinned host
// buffers, a caching allocator. Correct first (cuda_ops.h); compiled, not yet run on a GPU.
#include <stdio.h>
#include <string.h>

#include "ops/cuda/cuda_common.cuh"

#include "ops/cuda/cuda_gemm.cuh"

// --- setup --------------------------------------------------------------------------------------

// Proves that the binary holds code the device can run: an sm_90 build on an older GPU fails
// here, at setup, with a message, instead of in the first op.
static __global__ void probe_kernel(int *x) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *x = 42;
}

static char device_desc[256];   // "NVIDIA H100 80GB HBM3, sm_90, 79 GiB", for kernel_names

static int setup_once(nm_error *err) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n < 1) {
        const char *why = e != cudaSuccess ? cudaGetErrorString(e) : "no device found";
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return nm_error_set(err,
                            "backend cuda: no CUDA device is usable (cudaGetDeviceCount: %s): train on backend "
                            "cpu, or run on a machine with an NVIDIA GPU",
                            why);
    }
    cudaDeviceProp prop;
    // The current device: 0 unless the nccl communicator, set up first, picked this rank's
    // GPU (src/comm/comm_nccl.c); the model must compute where NCCL moves its buffers.
    int dev = 0;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess || (e = cudaSetDevice(dev)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, dev)) != cudaSuccess)
        return nm_error_set(err, "backend cuda: device %d is not usable (%s): train on backend cpu", dev,
                            cudaGetErrorString(e));
    if (!prop.managedMemory)
        return nm_error_set(err, "backend cuda: device %d (%s) has no managed memory, which this backend's "
                            "buffers are: train on backend cpu", dev, prop.name);
    // Code for the device: the build targets sm_90 (H100/H200) with PTX for newer GPUs to
    // JIT; an older GPU has no image to run.
    cudaFuncAttributes fa;
    int *x = NULL, got = 0;
    if ((e = cudaFuncGetAttributes(&fa, probe_kernel)) != cudaSuccess || (e = cudaMalloc(&x, sizeof(int))) != cudaSuccess) {
        cudaGetLastError();
        return nm_error_set(err, "backend cuda: this build has no code for device %d (%s, sm_%d%d): %s; rebuild "
                            "with -DCMAKE_CUDA_ARCHITECTURES=%d%d, or train on backend cpu", dev, prop.name, prop.major,
                            prop.minor, cudaGetErrorString(e), prop.major, prop.minor);
    }
    probe_kernel<<<1, 32>>>(x);
    if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaDeviceSynchronize()) != cudaSuccess ||
        (e = cudaMemcpy(&got, x, sizeof(int), cudaMemcpyDeviceToHost)) != cudaSuccess || got != 42) {
        cudaFree(x);
        return nm_error_set(err, "backend cuda: a test kernel did not run on device %d (%s, sm_%d%d): %s",
                            dev, prop.name, prop.major, prop.minor, e != cudaSuccess ? cudaGetErrorString(e)
                                                                                : "wrong result");
    }
    NM_CUDA_CALL(cudaFree(x));
    if (prop.major < 9)
        fprintf(stderr, "backend cuda: warning: device %d (%s) is sm_%d%d; this backend is built and meant for "
                "sm_90 (H100/H200)\n", dev, prop.name, prop.major, prop.minor);
    snprintf(device_desc, sizeof device_desc, "%.200s, sm_%d%d, %.0f GiB", prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return nm_cuda_gemm_setup(err);
}

int nm_cuda_setup(nm_error *err) {
    // once per process: the answer does not change, and the model and the tests both ask
    static int state = 0;  // 0 not asked, 1 usable, -1 not
    static nm_error saved;
    if (state == 0) state = setup_once(&saved) == 0 ? 1 : -1;
    if (state < 0) {
        if (err) *err = saved;
        return -1;
    }
    return 0;
}

const char *nm_cuda_kernel_names(void) {
    static char names[512];
    if (!names[0])
        snprintf(names, sizeof names, "fp32 GEMM cuBLASLt (fp32 compute), bf16 GEMM cuBLASLt, fp8 GEMM emulated "
                 "(dequantised, fp32 cuBLASLt), one stream, synchronised per op; %.300s",
                 device_desc[0] ? device_desc : "no device set up");
    return names;
}

// --- memory ---------------------------------------------------------------------------------------

// Managed memory: one address for host and device, so the model's host-side reads (loss sums,
// expert offsets, checkpoints) work unchanged. Zero-filled on the device, so the pages start
// there; aligned to at least 256 bytes by the driver (ops.h asks 64).
void *nm_cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (!bytes) bytes = 1;
    cudaError_t e = cudaMallocManaged(&p, bytes, cudaMemAttachGlobal);
    if (e != cudaSuccess)
        nm_panic(__FILE__, __LINE__, "backend cuda: cudaMallocManaged of %zu bytes (%.2f GiB) failed: %s", bytes,
                 (double)bytes / (1024.0 * 1024.0 * 1024.0), cudaGetErrorString(e));
    NM_CHECK(((uintptr_t)p & 63) == 0, "cudaMallocManaged returned %p, not 64-byte aligned", p);
    NM_CUDA_CALL(cudaMemsetAsync(p, 0, bytes, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
    return p;
}

void nm_cuda_free(void *p) {
    if (p) NM_CUDA_CALL(cudaFree(p));
}

// cudaMemcpyDefault: the unified address space tells host from device, so one function serves
// both directions and managed-to-managed copies. Synchronous for the host, as ops.h expects.
void nm_cuda_copy(void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    NM_CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
}

void nm_cuda_memset(void *dst, int value, size_t bytes) {
    if (!bytes) return;
    NM_CUDA_CALL(cudaMemsetAsync(dst, value, bytes, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
}

void nm_cuda_synchronize(void) { NM_CUDA_CALL(cudaDeviceSynchronize()); }

void nm_cuda_op_done(const char *op, const char *file, int line) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) nm_panic(file, line, "backend cuda: %s: kernel launch failed: %s", op, cudaGetErrorString(e));
    e = cudaStreamSynchronize(NM_CUDA_STREAM);
    if (e != cudaSuccess)
        nm_panic(file, line, "backend cuda: %s: the stream failed (this op's kernels or an earlier one's): %s", op,
                 cudaGetErrorString(e));
}

// --- scratch ---------------------------------------------------------------------------------------

static struct {
    void *data;
    size_t cap;                 // bytes
} scratch[NM_CUDA_SCRATCH_SLOTS];

void *nm_cuda_scratch(int slot, size_t bytes) {
    NM_CHECK(slot >= 0 && slot < NM_CUDA_SCRATCH_SLOTS, "cuda scratch slot %d", slot);
    if (!bytes) bytes = 1;
    if (bytes > scratch[slot].cap) {
        // device memory: only kernels and copies touch scratch. The stream is drained first,
        // so a buffer an earlier launch of this op still reads is never freed under it.
        NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
        if (scratch[slot].data) NM_CUDA_CALL(cudaFree(scratch[slot].data));
        scratch[slot].data = NULL;
        NM_CUDA_CALL(cudaMalloc(&scratch[slot].data, bytes));
        scratch[slot].cap = bytes;
    }
    return scratch[slot].data;
}

const void *nm_cuda_readable(const void *p, size_t bytes, int slot) {
    if (!p || !bytes) return p;
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        cudaGetLastError();  // not a pointer CUDA knows: plain host memory
        a.type = cudaMemoryTypeUnregistered;
    }
    if (a.type == cudaMemoryTypeManaged || a.type == cudaMemoryTypeDevice) return p;
    if (a.type == cudaMemoryTypeHost && a.devicePointer) return a.devicePointer;  // pinned, mapped
    void *d = nm_cuda_scratch(slot, bytes);
    NM_CUDA_CALL(cudaMemcpyAsync(d, p, bytes, cudaMemcpyHostToDevice, NM_CUDA_STREAM));
    return d;
}

// --- the peak ----------------------------------------------------------------------------------------

// Square GEMMs big enough to fill an H100 (n = 8192: 1.1 TFLOP a call, tens of ms at fp32's
// rate, a few at bf16's): the rate the MFU is against.
double nm_cuda_measure_peak(int bf16) {
    double peak = nm_ops_time_square_gemm(nm_ops_cuda(), 0, 8192);
    if (bf16) {
        double p16 = nm_ops_time_square_gemm(nm_ops_cuda(), 1, 8192);
        if (p16 > peak) peak = p16;
    }
    return peak;
}
