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

static int setup_once(const nm_ops *be, nm_error *err) {
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
    nm_cuda_ctx *ctx = nm_cuda_ctx_of(be);
    snprintf(ctx->device_desc, sizeof ctx->device_desc, "%.200s, sm_%d%d, %.0f GiB", prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return nm_cuda_gemm_setup(be, err);
}

int nm_cuda_setup(const nm_ops *be, nm_error *err) {
    // once per instance: the answer does not change, and the model and the tests both ask
    nm_cuda_ctx *ctx = nm_cuda_ctx_of(be);
    if (ctx->setup_state == 0) ctx->setup_state = setup_once(be, &ctx->setup_error) == 0 ? 1 : -1;
    if (ctx->setup_state < 0) {
        if (err) *err = ctx->setup_error;
        return -1;
    }
    return 0;
}

int nm_cuda_ctx_create(void **ctx, nm_error *err) {
    (void)err;  // nothing here touches the device: setup probes it
    *ctx = nm_calloc(1, sizeof(nm_cuda_ctx));
    return 0;
}

void nm_cuda_ctx_destroy(void *ctx) {
    nm_cuda_ctx *c = (nm_cuda_ctx *)ctx;
    if (!c) return;
    for (int i = 0; i < NM_CUDA_SCRATCH_SLOTS; i++)
        if (c->scratch[i].data) NM_CUDA_CALL(cudaFree(c->scratch[i].data));
    nm_cuda_gemm_state_destroy(c->gemm);
    nm_free(c);
}

const char *nm_cuda_kernel_names(const nm_ops *be) {
    nm_cuda_ctx *ctx = nm_cuda_ctx_of(be);
    char *names = ctx->kernel_names;
    if (!names[0])
        snprintf(names, sizeof ctx->kernel_names,
                 "fp32 GEMM cuBLASLt (fp32 compute), bf16 GEMM cuBLASLt, fp8 GEMM emulated "
                 "(dequantised, fp32 cuBLASLt), one stream, synchronised per op; %.300s",
                 ctx->device_desc[0] ? ctx->device_desc : "no device set up");
    return names;
}

// --- memory ---------------------------------------------------------------------------------------

// Managed memory: one address for host and device, so the model's host-side reads (loss sums,
// expert offsets, checkpoints) work unchanged. Zero-filled on the device, so the pages start
// there; aligned to at least 256 bytes by the driver (ops.h asks 64).
void *nm_cuda_alloc(const nm_ops *be, size_t bytes) {
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

void nm_cuda_free(const nm_ops *be, void *p) {
    if (p) NM_CUDA_CALL(cudaFree(p));
}

// cudaMemcpyDefault: the unified address space tells host from device, so one function serves
// both directions and managed-to-managed copies. Synchronous for the host, as ops.h expects.
void nm_cuda_copy(const nm_ops *be, void *dst, const void *src, size_t bytes) {
    if (!bytes) return;
    NM_CUDA_CALL(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
}

void nm_cuda_memset(const nm_ops *be, void *dst, int value, size_t bytes) {
    if (!bytes) return;
    NM_CUDA_CALL(cudaMemsetAsync(dst, value, bytes, NM_CUDA_STREAM));
    NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
}

// Device memory stays allocated (the caching allocator would hand it back to us anyway): zeros.
void nm_cuda_discard(const nm_ops *be, void *dst, size_t bytes) { nm_cuda_memset(be, dst, 0, bytes); }

void nm_cuda_synchronize(const nm_ops *be) { NM_CUDA_CALL(cudaDeviceSynchronize()); }

void nm_cuda_op_done(const char *op, const char *file, int line) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) nm_panic(file, line, "backend cuda: %s: kernel launch failed: %s", op, cudaGetErrorString(e));
    e = cudaStreamSynchronize(NM_CUDA_STREAM);
    if (e != cudaSuccess)
        nm_panic(file, line, "backend cuda: %s: the stream failed (this op's kernels or an earlier one's): %s", op,
                 cudaGetErrorString(e));
}

// --- scratch ---------------------------------------------------------------------------------------

void *nm_cuda_scratch(const nm_ops *be, int slot, size_t bytes) {
    NM_CHECK(slot >= 0 && slot < NM_CUDA_SCRATCH_SLOTS, "cuda scratch slot %d", slot);
    nm_cuda_ctx *ctx = nm_cuda_ctx_of(be);
    if (!bytes) bytes = 1;
    if (bytes > ctx->scratch[slot].cap) {
        // device memory: only kernels and copies touch scratch. The stream is drained first,
        // so a buffer an earlier launch of this op still reads is never freed under it.
        NM_CUDA_CALL(cudaStreamSynchronize(NM_CUDA_STREAM));
        if (ctx->scratch[slot].data) NM_CUDA_CALL(cudaFree(ctx->scratch[slot].data));
        ctx->scratch[slot].data = NULL;
        NM_CUDA_CALL(cudaMalloc(&ctx->scratch[slot].data, bytes));
        ctx->scratch[slot].cap = bytes;
    }
    return ctx->scratch[slot].data;
}

const void *nm_cuda_readable(const nm_ops *be, const void *p, size_t bytes, int slot) {
    if (!p || !bytes) return p;
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        cudaGetLastError();  // not a pointer CUDA knows: plain host memory
        a.type = cudaMemoryTypeUnregistered;
    }
    if (a.type == cudaMemoryTypeManaged || a.type == cudaMemoryTypeDevice) return p;
    if (a.type == cudaMemoryTypeHost && a.devicePointer) return a.devicePointer;  // pinned, mapped
    void *d = nm_cuda_scratch(be, slot, bytes);
    NM_CUDA_CALL(cudaMemcpyAsync(d, p, bytes, cudaMemcpyHostToDevice, NM_CUDA_STREAM));
    return d;
}

// --- the peak ----------------------------------------------------------------------------------------

// Square GEMMs big enough to fill an H100 (n = 8192: 1.1 TFLOP a call, tens of ms at fp32's
// rate, a few at bf16's): the rate the MFU is against.
double nm_cuda_measure_peak(const nm_ops *be, int bf16) {
    double peak = nm_ops_time_square_gemm(be, 0, 8192);
    if (bf16) {
        double p16 = nm_ops_time_square_gemm(be, 1, 8192);
        if (p16 > peak) peak = p16;
    }
    return peak;
}
