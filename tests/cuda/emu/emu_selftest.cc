/*
 * emu_selftest: the CPU emulator's own checks (tests/cuda/emu). It must run correct
 * kernels right and make the faults it claims to expose show: a missing __syncthreads
 * changes the result between thread orders, a barrier some threads never reach is a
 * deadlock, a full-mask shuffle in a partial warp is refused, host code touching device
 * memory dies with a message (with KN_EMU_GUARD=1 instead: a kernel writing past an
 * allocation's end dies naming it), another device's memory or stream is refused without
 * peer access, a pageable pointer passed to a kernel is refused, an asynchronous copy read
 * before its stream is waited for shows the old bytes, a read that another stream
 * overwrites without waiting shows the new ones under KN_EMU_STREAMS=shuffle, copies out
 * of bounds fail, and dynamic shared memory past the kernel's limit fails to launch.
 * Faults that end the process run in a child. Prints "ok - NAME" / "not ok - NAME" lines.
 */
#include "kn_cuda_common.cuh"

#include <mma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace nvcuda;

static int failures;

static void report(const char *name, bool ok, const char *detail = "")
{
    printf("%s - %s%s%s\n", ok ? "ok" : "not ok", name, *detail ? " " : "", detail);
    failures += !ok;
}

/* out[0] = sum of in[i] over the block, through shared memory and warp shuffles */
__global__ void block_sum(const float *in, float *out)
{
    __shared__ float red[32];
    float v = in[threadIdx.x];
    float s = kn_block_reduce(v, red, 0);
    if (threadIdx.x == 0) out[0] = s;
}

/* each thread reads its right neighbour's value from shared memory: with the barrier,
 * or (race) without it */
__global__ void neighbour(const float *in, float *out, int with_barrier)
{
    KN_DYN_SMEM(float, sm);
    int n = blockDim.x, t = threadIdx.x;
    sm[t] = in[t];
    if (with_barrier) __syncthreads();
    out[t] = sm[(t + 1) % n];
}

__global__ void stuck(float *out)
{
    if (threadIdx.x == 0)
        __syncthreads();
    else
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void touch(float *p)
{
    p[threadIdx.x] = 1.0f;
}

__global__ void big_smem(float *p)
{
    KN_DYN_SMEM(float, sm);
    sm[threadIdx.x] = 1.0f;
    p[threadIdx.x] = sm[threadIdx.x];
}

/* one 16x16x16 product by one warp */
__global__ void mma16(const __nv_bfloat16 *a, const __nv_bfloat16 *b, float *c)
{
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

/* c += a b in place: the warp's lanes all load c before any of them stores it */
__global__ void mma16_acc(const __nv_bfloat16 *a, const __nv_bfloat16 *b, float *c)
{
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

static float *dev_floats(const float *h, int n)
{
    float *d = NULL;
    if (cudaMalloc((void **)&d, sizeof(float) * n) != cudaSuccess) abort();
    if (h && cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice) != cudaSuccess) abort();
    return d;
}

/* runs fn in a child; whether it died (not exit 0) with `want` in its stderr */
static bool dies_with(void (*fn)(void), const char *want, char *seen, size_t seen_len)
{
    int pfd[2];
    if (pipe(pfd)) return false;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pfd[1], 2);
        close(pfd[0]);
        fn();
        _exit(0);
    }
    close(pfd[1]);
    char buf[8192];
    size_t n = 0;
    ssize_t r;
    while ((r = read(pfd[0], buf + n, sizeof(buf) - 1 - n)) > 0)
        n += (size_t)r;
    buf[n] = 0;
    close(pfd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const char *line = strstr(buf, "kn_emu:");
    snprintf(seen, seen_len, "%.*s", line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    bool died = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    return died && strstr(buf, want);
}

static void child_stuck(void)
{
    float *d = dev_floats(NULL, 64);
    KN_LAUNCH(stuck, 1, 64, 0, 0)(d);
    cudaDeviceSynchronize();
}

static void child_partial_warp(void)
{
    float h[48] = {0};
    float *in = dev_floats(h, 48), *out = dev_floats(NULL, 1);
    KN_LAUNCH(block_sum, 1, 48, 0, 0)(in, out); /* full-mask shuffles in a 16-thread warp */
    cudaDeviceSynchronize();
}

static void child_peer_memory(void)
{
    cudaSetDevice(1);
    float *d1 = dev_floats(NULL, 32); /* device 1's memory */
    cudaSetDevice(0);
    KN_LAUNCH(touch, 1, 32, 0, 0)(d1); /* used on device 0 without peer access */
    cudaDeviceSynchronize();
}

static void child_host_touch(void)
{
    float *d = dev_floats(NULL, 4);
    d[1] = 2.0f; /* a device pointer used as a host one */
}

/* 33 floats, written by 40 threads: past the allocation's end (KN_EMU_GUARD) */
static void child_overrun(void)
{
    float *d = dev_floats(NULL, 33);
    KN_LAUNCH(touch, 1, 40, 0, 0)(d);
    cudaDeviceSynchronize();
}

static void child_pageable_arg(void)
{
    static float host[32];
    KN_LAUNCH(touch, 1, 32, 0, 0)(host);
    cudaDeviceSynchronize();
}

int main(void)
{
    setenv("KN_EMU_DEVICES", "2", 1); /* before the emulator reads its settings */
    if (cudaSetDevice(0) != cudaSuccess) return 1;
    char seen[512];

    /* block reduction with shuffles */
    for (int n : {32, 256, 1024}) {
        float h[1024], want = 0.0f, got = -1.0f;
        for (int i = 0; i < n; i++) {
            h[i] = (float)(i % 7) - 3.0f;
            want += h[i];
        }
        float *in = dev_floats(h, n), *out = dev_floats(NULL, 1);
        KN_LAUNCH(block_sum, 1, n, 0, 0)(in, out);
        cudaMemcpy(&got, out, sizeof(float), cudaMemcpyDeviceToHost);
        char d[64];
        snprintf(d, sizeof(d), "(%d threads: %g, want %g)", n, got, want);
        report("block_reduce", got == want, d);
        cudaFree(in);
        cudaFree(out);
    }

    /* a missing barrier: the emulator's thread order decides what the race reads */
    {
        const int n = 64;
        float h[n], got[n];
        for (int i = 0; i < n; i++)
            h[i] = (float)i;
        float *in = dev_floats(h, n), *out = dev_floats(NULL, n);
        KN_LAUNCH(neighbour, 1, n, sizeof(float) * n, 0)(in, out, 1);
        cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
        bool right = true;
        for (int i = 0; i < n; i++)
            right &= got[i] == h[(i + 1) % n];
        report("barrier_kept", right);
        KN_LAUNCH(neighbour, 1, n, sizeof(float) * n, 0)(in, out, 0);
        cudaMemcpy(got, out, sizeof(got), cudaMemcpyDeviceToHost);
        int wrong = 0;
        for (int i = 0; i < n; i++)
            wrong += got[i] != h[(i + 1) % n];
        char d[96];
        snprintf(d, sizeof(d), "(%d of %d threads read a neighbour that had not written)", wrong,
                 n);
        report("barrier_missing_shows", wrong > 0, d);
        cudaFree(in);
        cudaFree(out);
    }

    /* warp matrix product */
    {
        __nv_bfloat16 a[256], b[256];
        float want[256], got[256];
        for (int i = 0; i < 256; i++) {
            a[i] = __float2bfloat16_rn((float)(i % 5) - 2.0f);
            b[i] = __float2bfloat16_rn((float)(i % 3) - 1.0f);
        }
        for (int m = 0; m < 16; m++) /* b col-major: element (k, n) at b[n * 16 + k] */
            for (int n = 0; n < 16; n++) {
                float s = 0.0f;
                for (int k = 0; k < 16; k++)
                    s += __bfloat162float(a[m * 16 + k]) * __bfloat162float(b[n * 16 + k]);
                want[m * 16 + n] = s;
            }
        __nv_bfloat16 *da, *db;
        cudaMalloc((void **)&da, sizeof(a));
        cudaMalloc((void **)&db, sizeof(b));
        cudaMemcpy(da, a, sizeof(a), cudaMemcpyHostToDevice);
        cudaMemcpy(db, b, sizeof(b), cudaMemcpyHostToDevice);
        float *dc = dev_floats(NULL, 256);
        KN_LAUNCH(mma16, 1, 32, 0, 0)(da, db, dc);
        cudaMemcpy(got, dc, sizeof(got), cudaMemcpyDeviceToHost);
        report("wmma_16x16x16", !memcmp(got, want, sizeof(got)));
        KN_LAUNCH(mma16_acc, 1, 32, 0, 0)(da, db, dc); /* c = ab + ab */
        cudaMemcpy(got, dc, sizeof(got), cudaMemcpyDeviceToHost);
        bool same = true;
        for (int i = 0; i < 256; i++)
            same &= got[i] == 2.0f * want[i];
        report("wmma_accumulate_in_place", same);
    }

    /* an asynchronous copy to pinned memory lands when its stream runs */
    {
        cudaStream_t s;
        cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        float one = 1.0f, *pinned = NULL;
        cudaHostAlloc((void **)&pinned, sizeof(float), cudaHostAllocPortable);
        *pinned = 0.0f;
        float *d = dev_floats(&one, 1);
        cudaEvent_t ev;
        cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
        cudaMemcpyAsync(pinned, d, sizeof(float), cudaMemcpyDeviceToHost, s);
        cudaEventRecord(ev, s);
        float before = *pinned;
        cudaError_t q1 = cudaEventQuery(ev), q2 = cudaEventQuery(ev);
        float after = *pinned;
        char det[128];
        snprintf(det, sizeof(det), "(before the wait %g, queries %d then %d, after %g)", before,
                 (int)q1, (int)q2, after);
        report("async_copy_lands_when_waited",
               before == 0.0f && q1 == cudaErrorNotReady && q2 == cudaSuccess && after == 1.0f,
               det);
        cudaEventDestroy(ev);
        cudaFreeHost(pinned);
        cudaFree(d);
        cudaStreamDestroy(s);
    }

    /* a captured graph replays its work, reading memory when it runs; a pageable copy
     * in a capture invalidates it */
    {
        cudaStream_t s;
        cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        float h[32], got[32];
        for (int i = 0; i < 32; i++)
            h[i] = (float)i;
        float *in = dev_floats(h, 32), *out = dev_floats(NULL, 1);
        cudaGraph_t g = NULL;
        cudaGraphExec_t ex = NULL;
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        KN_LAUNCH(block_sum, 1, 32, 0, s)(in, out);
        cudaError_t ee = cudaStreamEndCapture(s, &g);
        cudaError_t ei = cudaGraphInstantiate(&ex, g, 0);
        float before = -1.0f, first = -1.0f, second = -1.0f;
        cudaMemcpy(&before, out, sizeof(float), cudaMemcpyDeviceToHost); /* nothing ran */
        cudaGraphLaunch(ex, s);
        cudaStreamSynchronize(s);
        cudaMemcpy(&first, out, sizeof(float), cudaMemcpyDeviceToHost);
        for (int i = 0; i < 32; i++)
            h[i] = 1.0f;
        cudaMemcpy(in, h, sizeof(h), cudaMemcpyHostToDevice);
        cudaGraphLaunch(ex, s);
        cudaStreamSynchronize(s);
        cudaMemcpy(&second, out, sizeof(float), cudaMemcpyDeviceToHost);
        char d[128];
        snprintf(d, sizeof(d), "(before %g, first launch %g, second %g)", before, first, second);
        report("graph_replays",
               ee == cudaSuccess && ei == cudaSuccess && before != 496.0f && first == 496.0f &&
                   second == 32.0f,
               d);
        cudaGraphExecDestroy(ex);
        cudaGraphDestroy(g);
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        cudaError_t ec = cudaMemcpyAsync(in, h, sizeof(h), cudaMemcpyHostToDevice, s);
        cudaError_t es = cudaStreamSynchronize(s);
        g = NULL;
        ee = cudaStreamEndCapture(s, &g);
        cudaGetLastError();
        report("graph_capture_refuses_pageable_and_sync",
               ec == cudaErrorStreamCaptureUnsupported && es == cudaErrorStreamCaptureUnsupported &&
                   ee == cudaErrorStreamCaptureInvalidated && !g);
        cudaFree(in);
        cudaFree(out);
        (void)got;
        cudaStreamDestroy(s);
    }

    /* copies stay inside their allocation */
    {
        float h[8] = {0};
        float *d = dev_floats(NULL, 4);
        cudaError_t e = cudaMemcpy(d, h, sizeof(h), cudaMemcpyHostToDevice);
        cudaError_t e2 = cudaMemcpy(h, d, sizeof(float), cudaMemcpyHostToDevice); /* kind */
        cudaGetLastError();
        report("copy_out_of_bounds_fails",
               e == cudaErrorInvalidValue && e2 == cudaErrorInvalidValue);
        cudaFree(d);
    }

    /* dynamic shared memory past 48 KiB needs the kernel's attribute */
    {
        float *d = dev_floats(NULL, 32);
        KN_LAUNCH(big_smem, 1, 32, 64 << 10, 0)(d);
        cudaError_t e1 = cudaGetLastError();
        cudaError_t ea =
            cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10);
        KN_LAUNCH(big_smem, 1, 32, 64 << 10, 0)(d);
        cudaError_t e2 = cudaGetLastError();
        report("smem_limit", e1 == cudaErrorInvalidValue && ea == cudaSuccess && e2 == cudaSuccess);
        cudaDeviceSynchronize();
        cudaFree(d);
    }

    /* A reads a buffer that B then overwrites. Without B waiting for A's event the read
     * may see the new value (a race); with the wait it never does. In the lazy order the
     * host's sync of A runs A first, so only KN_EMU_STREAMS=shuffle shows the race. */
    {
        cudaStream_t a, b;
        cudaEvent_t read_done;
        cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
        cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);
        cudaEventCreateWithFlags(&read_done, cudaEventDisableTiming);
        const char *mode = getenv("KN_EMU_STREAMS");
        bool shuffle = mode && !strcmp(mode, "shuffle");
        float one[32], two[32], back[32];
        for (int i = 0; i < 32; i++) {
            one[i] = 1.0f;
            two[i] = 2.0f;
        }
        float *buf = dev_floats(NULL, 32), *out = dev_floats(NULL, 32), *src2 = dev_floats(two, 32);
        int stale[2] = {0, 0};
        for (int with_wait = 0; with_wait < 2; with_wait++)
            for (int trial = 0; trial < 32; trial++) {
                cudaMemcpy(buf, one, sizeof(one), cudaMemcpyHostToDevice);
                cudaDeviceSynchronize();
                cudaMemcpyAsync(out, buf, sizeof(one), cudaMemcpyDeviceToDevice, a);
                cudaEventRecord(read_done, a);
                if (with_wait) cudaStreamWaitEvent(b, read_done, 0);
                cudaMemcpyAsync(buf, src2, sizeof(two), cudaMemcpyDeviceToDevice, b);
                cudaStreamSynchronize(a);
                cudaMemcpy(back, out, sizeof(back), cudaMemcpyDeviceToHost);
                stale[with_wait] += back[0] != 1.0f;
                cudaDeviceSynchronize();
            }
        char d[96];
        snprintf(d, sizeof(d), "(%s: %d of 32 reads raced without the wait, %d with it)",
                 shuffle ? "shuffle" : "lazy", stale[0], stale[1]);
        report("stream_order", stale[1] == 0 && (shuffle ? stale[0] > 0 : stale[0] == 0), d);
        cudaFree(buf);
        cudaFree(out);
        cudaFree(src2);
        cudaEventDestroy(read_done);
        cudaStreamDestroy(a);
        cudaStreamDestroy(b);
    }

    /* a launch on another device's stream */
    {
        cudaStream_t s1;
        cudaSetDevice(1);
        cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking);
        cudaSetDevice(0);
        float *d = dev_floats(NULL, 32);
        KN_LAUNCH(touch, 1, 32, 0, s1)(d);
        cudaError_t e = cudaGetLastError();
        report("other_device_stream_refused", e == cudaErrorInvalidResourceHandle);
        cudaStreamDestroy(s1);
        cudaFree(d);
    }

    bool died = dies_with(child_stuck, "deadlock", seen, sizeof(seen));
    report("deadlock_reported", died, seen);
    died = dies_with(child_partial_warp, "past the block's last thread", seen, sizeof(seen));
    report("partial_warp_shuffle_reported", died, seen);
    died = dies_with(child_peer_memory, "without peer access", seen, sizeof(seen));
    report("peer_memory_without_access_reported", died, seen);
    const char *guard = getenv("KN_EMU_GUARD");
    if (guard && !strcmp(guard, "1")) { /* device memory open to the host, guard pages */
        died =
            dies_with(child_overrun, "past the end of the device allocation", seen, sizeof(seen));
        report("overrun_reported", died, seen);
    } else {
        died = dies_with(child_host_touch, "host code touched device memory", seen, sizeof(seen));
        report("host_touch_reported", died, seen);
    }
    died = dies_with(child_pageable_arg, "pageable host memory", seen, sizeof(seen));
    report("pageable_argument_reported", died, seen);
    return failures ? 1 : 0;
}
