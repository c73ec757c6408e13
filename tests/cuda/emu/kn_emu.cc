/*
 * kn_emu: a CPU emulator of the CUDA runtime, of cuBLASLt's matmul and of kernel
 * execution, linked with the cuda backend's own sources into a libafdcuda.so that runs
 * without a GPU (make builds it as $(BUILD)/emu/lib/libafdcuda.so; AFD_CUDA_LIB selects
 * it). It exists to run the backend's host logic and kernels in make test, and it is
 * strict where a GPU would be silent or would fail later:
 *
 *  - Device memory lives in a region of its own that is inaccessible (PROT_NONE) except
 *    while emulated device work runs: host code that touches a device pointer faults at
 *    once, with a message naming the allocation.
 *  - Streams are queues, run as late as CUDA allows: at a synchronisation
 *    (cudaStreamSynchronize, cudaEventSynchronize, cudaDeviceSynchronize, cudaFree), when
 *    an event query finds the work pending (the first query answers cudaErrorNotReady),
 *    or when a stream waits for an event. Host code that reads a result, or reuses a
 *    pinned buffer, before it has waited sees what a GPU would let it see. With
 *    KN_EMU_STREAMS=shuffle, other streams run part of their queued work, chosen at
 *    random, before a stream is made to run: an order a device running streams at the
 *    same time could take, so a missing wait between streams changes results. Copies from
 *    pageable memory and to it follow CUDA's rules (the source is read at the call; a
 *    copy to pageable memory waits for its stream).
 *  - Copies and memsets must stay inside one allocation, in the direction their kind
 *    says; kernel pointer arguments must be device memory, pinned host memory or NULL;
 *    launch shapes and dynamic shared memory are checked against the device's limits and
 *    the kernel's attribute; dynamic shared memory starts as NaN bytes.
 *  - Within a block, threads are fibers that switch only at __syncthreads, warp
 *    operations and their end (kernels run one at a time in the process). KN_EMU_ORDER
 *    (forward, reverse, random) sets the order in which runnable threads go, so that a
 *    missing barrier changes results between orders.
 *
 * Knobs (environment): KN_EMU_DEVICES (1), KN_EMU_FP8 (1: block-scaled fp8 matmuls
 * exist), KN_EMU_SCALE_W / KN_EMU_SCALE_X (outer_fast, inner_fast, outer_tight: where the
 * block-scaled matmul reads its scales), KN_EMU_PROTECT (1), KN_EMU_ORDER (forward),
 * KN_EMU_STREAMS (lazy, shuffle), KN_EMU_SEED (0: the random order's and the shuffle's
 * seed), KN_EMU_GUARD (0; 1: each allocation ends at an inaccessible page, so that an
 * access past its end faults with a message naming the kernel, its block and thread and
 * the allocation; device memory is then open to the host, KN_EMU_PROTECT's check off),
 * KN_EMU_MEM_GB (64: the device region's size).
 */
#include "cublasLt.h"
#include "cuda_bf16.h"
#include "cuda_fp8.h"
#include "cuda_runtime.h"

#include <algorithm>
#include <deque>
#include <execinfo.h>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define EXPORT __attribute__((visibility("default")))

namespace
{

/* ---- configuration ---- */

int env_int(const char *name, int def)
{
    const char *s = getenv(name);
    return s && *s ? atoi(s) : def;
}

enum order_t { ORDER_FORWARD, ORDER_REVERSE, ORDER_RANDOM };

struct config {
    int devices, fp8, protect, guard, scale_w, scale_x;
    order_t order;
    bool shuffle; /* KN_EMU_STREAMS=shuffle: other streams' work runs early, at random */
    unsigned long long seed;
    size_t mem_bytes;
    config()
    {
        const char *st = getenv("KN_EMU_STREAMS");
        shuffle = st && !strcmp(st, "shuffle");
        const char *sd = getenv("KN_EMU_SEED");
        seed = sd && *sd ? strtoull(sd, nullptr, 0) : 0;
        devices = env_int("KN_EMU_DEVICES", 1);
        fp8 = env_int("KN_EMU_FP8", 1);
        guard = env_int("KN_EMU_GUARD", 0);
        protect = guard ? 0 : env_int("KN_EMU_PROTECT", 1); /* guard pages instead */
        scale_w = scale_order(getenv("KN_EMU_SCALE_W"));
        scale_x = scale_order(getenv("KN_EMU_SCALE_X"));
        const char *o = getenv("KN_EMU_ORDER");
        order = o && !strcmp(o, "reverse")  ? ORDER_REVERSE
                : o && !strcmp(o, "random") ? ORDER_RANDOM
                                            : ORDER_FORWARD;
        mem_bytes = (size_t)env_int("KN_EMU_MEM_GB", 64) << 30;
    }
    static int scale_order(const char *s)
    {
        if (s && !strcmp(s, "inner_fast")) return 1;
        if (s && !strcmp(s, "outer_tight")) return 2;
        return 0; /* outer_fast: column-major, the outer dimension padded to 4 */
    }
};

const config &cfg()
{
    static config c;
    return c;
}

/* the random thread order's and the stream shuffle's generator (xorshift; KN_EMU_SEED) */
uint64_t rng()
{
    static uint64_t x = (0x9e3779b97f4a7c15ull ^ (cfg().seed * 0xbf58476d1ce4e5b9ull)) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

void vsay(const char *fmt, va_list ap)
{
    fprintf(stderr, "kn_emu: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
}

/* a message on stderr */
void complain(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void complain(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
}

/* a message and a backtrace, then the process ends: a fault a GPU would not survive */
[[noreturn]] void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsay(fmt, ap);
    va_end(ap);
    void *bt[32];
    int n = backtrace(bt, 32);
    backtrace_symbols_fd(bt, n, 2);
    abort();
}

/* every entry point holds this: device work, allocation and queues are one at a time */
std::recursive_mutex g_mu;
thread_local cudaError_t g_last = cudaSuccess;
thread_local int g_device = 0;

cudaError_t fail(cudaError_t e)
{
    g_last = e;
    return e;
}

/* ---- device memory ---- */

struct devmem {
    char *base = nullptr;
    size_t cap = 0, top = 0, hwm = 0;  /* hwm: page-rounded top ever reached */
    std::map<size_t, size_t> free_ext; /* offset -> bytes */
    std::map<uintptr_t, size_t> live;  /* address -> bytes asked for */
    std::map<uintptr_t, int> dev_of;   /* address -> the device it was allocated on */
    int depth = 0;                     /* open (accessible) while > 0 */
    std::map<uintptr_t, size_t> pinned;
    /* KN_EMU_GUARD: each allocation ends where an inaccessible page begins (its data
     * right-aligned to 16 bytes before it), and its pages are always open: a read or
     * write past the end faults at once, in a kernel or anywhere else */
    std::map<uintptr_t, std::pair<size_t, size_t>> span; /* address -> (offset, pages) */
    size_t page = 0;

    void init()
    {
        if (base) return;
        cap = cfg().mem_bytes;
        page = (size_t)sysconf(_SC_PAGESIZE);
        void *p = mmap(nullptr, cap, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) fatal("cannot reserve %zu bytes of address space", cap);
        base = (char *)p;
    }
    int protect() const
    {
        return cfg().protect;
    }
    void open()
    {
        if (depth++ == 0 && protect() && hwm) mprotect(base, hwm, PROT_READ | PROT_WRITE);
    }
    void close()
    {
        if (--depth == 0 && protect() && hwm) mprotect(base, hwm, PROT_NONE);
    }
    bool in_region(const void *p) const
    {
        return base && (const char *)p >= base && (const char *)p < base + cap;
    }
    /* the live allocation holding [p, p + bytes), or 0 */
    uintptr_t owner(const void *p, size_t bytes) const
    {
        uintptr_t a = (uintptr_t)p;
        auto it = live.upper_bound(a);
        if (it == live.begin()) return 0;
        --it;
        if (a < it->first || a + bytes > it->first + it->second) return 0;
        return it->first;
    }
    bool is_pinned(const void *p) const
    {
        uintptr_t a = (uintptr_t)p;
        auto it = pinned.upper_bound(a);
        if (it == pinned.begin()) return false;
        --it;
        return a >= it->first && a <= it->first + it->second;
    }
    /* want bytes from the free list (first fit) or the top; the offset, or SIZE_MAX */
    size_t take(size_t want)
    {
        for (auto it = free_ext.begin(); it != free_ext.end(); ++it)
            if (it->second >= want) {
                size_t off = it->first, rest = it->second - want;
                free_ext.erase(it);
                if (rest) free_ext[off + want] = rest;
                return off;
            }
        if (top + want > cap) return SIZE_MAX;
        top += want;
        return top - want;
    }
    void *alloc_guarded(size_t bytes)
    {
        size_t sz = (std::max<size_t>(bytes, 1) + 15) & ~(size_t)15;
        size_t np = (sz + page - 1) / page, off = take((np + 1) * page); /* + the guard page */
        if (off == SIZE_MAX) return nullptr;
        mprotect(base + off, np * page, PROT_READ | PROT_WRITE);
        char *p = base + off + np * page - sz;
        live[(uintptr_t)p] = bytes;
        dev_of[(uintptr_t)p] = g_device;
        span[(uintptr_t)p] = {off, np};
        memset(p, 0xcd, std::min<size_t>(sz, (size_t)1 << 20));
        return p;
    }
    bool release_guarded(void *p)
    {
        auto it = span.find((uintptr_t)p);
        if (it == span.end()) return false;
        size_t off = it->second.first, np = it->second.second;
        span.erase(it);
        live.erase((uintptr_t)p);
        dev_of.erase((uintptr_t)p);
        mprotect(base + off, np * page, PROT_NONE);
        madvise(base + off, np * page, MADV_DONTNEED);
        give_back(off, (np + 1) * page);
        return true;
    }
    void give_back(size_t off, size_t sz)
    {
        auto nx = free_ext.lower_bound(off); /* coalesce with the neighbours */
        if (nx != free_ext.end() && nx->first == off + sz) {
            sz += nx->second;
            free_ext.erase(nx);
        }
        auto pv = free_ext.lower_bound(off);
        if (pv != free_ext.begin()) {
            --pv;
            if (pv->first + pv->second == off) {
                off = pv->first;
                sz += pv->second;
                free_ext.erase(pv);
            }
        }
        free_ext[off] = sz;
    }
    void *alloc(size_t bytes)
    {
        init();
        if (cfg().guard) return alloc_guarded(bytes);
        size_t sz = (std::max<size_t>(bytes, 1) + 255) & ~(size_t)255;
        size_t off = take(sz);
        if (off == SIZE_MAX) return nullptr;
        size_t nh = (top + page - 1) / page * page;
        if (nh > hwm) { /* the top grew: its new pages open with the rest */
            if (depth > 0 || !protect()) mprotect(base + hwm, nh - hwm, PROT_READ | PROT_WRITE);
            hwm = nh;
        }
        char *p = base + off;
        live[(uintptr_t)p] = bytes;
        dev_of[(uintptr_t)p] = g_device;
        open(); /* cudaMalloc's memory is not zeroed: make that visible */
        memset(p, 0xcd, std::min<size_t>(sz, (size_t)1 << 20));
        close();
        return p;
    }
    bool release(void *p)
    {
        if (cfg().guard) return release_guarded(p);
        auto it = live.find((uintptr_t)p);
        if (it == live.end()) return false;
        size_t off = (size_t)((char *)p - base);
        size_t sz = (std::max<size_t>(it->second, 1) + 255) & ~(size_t)255;
        live.erase(it);
        dev_of.erase((uintptr_t)p);
        if (sz >= ((size_t)1 << 20)) madvise(p, sz, MADV_DONTNEED);
        give_back(off, sz);
        return true;
    }
};

devmem g_mem;

struct dev_access {
    dev_access()
    {
        g_mem.open();
    }
    ~dev_access()
    {
        g_mem.close();
    }
};

/* ---- streams and events ---- */

struct op_t {
    uint64_t seq;
    std::function<void()> fn;
};

} // namespace

struct kn_emu_stream {
    int device = 0;
    uint64_t next = 1, done = 0;
    std::deque<op_t> q;
    /* capturing: what is queued goes to `captured`; `capture_bad` once an operation that a
     * capture cannot hold was asked for (the capture then ends invalidated) */
    bool capturing = false, capture_bad = false;
    std::vector<std::function<void()>> captured;
};

struct kn_emu_graph {
    std::vector<std::function<void()>> ops;
};

struct kn_emu_graph_exec {
    std::shared_ptr<const std::vector<std::function<void()>>> ops;
};

struct kn_emu_event {
    kn_emu_stream *stream = nullptr;
    uint64_t seq = 0;
    bool queried = false;
};

namespace
{

kn_emu_stream g_legacy;
std::set<std::pair<int, int>> g_peer; /* (device, peer) pairs with peer access enabled */
std::set<kn_emu_stream *> g_streams;
std::set<kn_emu_event *> g_events;

kn_emu_stream *stream_of(cudaStream_t s)
{
    return s ? s : &g_legacy;
}

bool stream_ok(cudaStream_t s)
{
    return !s || g_streams.count(s);
}

void run_until(kn_emu_stream *s, uint64_t seq)
{
    while (!s->q.empty() && s->q.front().seq <= seq) {
        op_t op = std::move(s->q.front());
        s->q.pop_front();
        op.fn();
        s->done = op.seq;
    }
}

int g_flush_depth; /* flushes in progress (a stream waiting for an event flushes another) */

/* KN_EMU_STREAMS=shuffle: before a stream is made to run, other streams run part of their
 * queued work, chosen at random: the order a device could take when it runs streams at
 * the same time. Any prefix of a queue may run at any moment (a wait inside it runs what
 * it waits for first), so every order taken is one CUDA allows; a missing dependency
 * between streams then shows as a wrong result in some runs and seeds. */
void shuffle_others(kn_emu_stream *s)
{
    std::vector<kn_emu_stream *> others;
    if (&g_legacy != s && !g_legacy.q.empty()) others.push_back(&g_legacy);
    for (kn_emu_stream *o : g_streams)
        if (o != s && !o->q.empty()) others.push_back(o);
    for (size_t i = others.size(); i > 1; i--)
        std::swap(others[i - 1], others[rng() % i]);
    for (kn_emu_stream *o : others) {
        if (o->q.empty() || rng() % 2) continue; /* emptied by an earlier one's waits */
        uint64_t first = o->q.front().seq, last = o->q.back().seq;
        run_until(o, first + rng() % (last - first + 1));
    }
}

/* runs s's queue up to and including seq */
void flush_until(kn_emu_stream *s, uint64_t seq)
{
    if (s->q.empty() || s->q.front().seq > seq) return;
    dev_access a; /* once for the run of operations */
    if (g_flush_depth++ == 0 && cfg().shuffle) shuffle_others(s);
    run_until(s, seq);
    g_flush_depth--;
}

void flush(kn_emu_stream *s)
{
    flush_until(s, UINT64_MAX);
}

void flush_all()
{
    flush(&g_legacy);
    for (kn_emu_stream *s : g_streams)
        flush(s);
}

/* the stream this thread is capturing into, if any (cudaStreamCaptureModeThreadLocal:
 * its unsafe calls are refused while it captures) */
thread_local kn_emu_stream *t_capturing;

/* an operation a capture cannot hold, asked for while this thread captures: the capture
 * ends invalidated, and the call fails as on a GPU */
bool capture_refuses(const char *what)
{
    if (!t_capturing) return false;
    complain("%s while stream capture is active: not allowed in a capture", what);
    t_capturing->capture_bad = true;
    return true;
}

uint64_t enqueue(cudaStream_t st, std::function<void()> fn)
{
    kn_emu_stream *s = stream_of(st);
    if (s->capturing) {
        s->captured.push_back(std::move(fn));
        return 0;
    }
    uint64_t seq = s->next++;
    s->q.push_back(op_t{seq, std::move(fn)});
    return seq;
}

const char *kind_name(cudaMemcpyKind k)
{
    switch (k) {
    case cudaMemcpyHostToHost:
        return "host to host";
    case cudaMemcpyHostToDevice:
        return "host to device";
    case cudaMemcpyDeviceToHost:
        return "device to host";
    case cudaMemcpyDeviceToDevice:
        return "device to device";
    default:
        return "default";
    }
}

/* a device range of a copy or memset: inside one allocation */
bool dev_range_ok(const void *p, size_t bytes, const char *what)
{
    if (!g_mem.in_region(p)) {
        complain("%s: %p is not device memory", what, p);
        return false;
    }
    if (!g_mem.owner(p, bytes)) {
        complain("%s: %zu bytes at %p run outside every device allocation", what, bytes, p);
        return false;
    }
    return true;
}

bool host_range_ok(const void *p, const char *what)
{
    if (g_mem.in_region(p)) {
        complain("%s: %p is device memory where the copy's kind says host", what, p);
        return false;
    }
    return true;
}

cudaError_t copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t st,
                 bool async, const char *what)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!stream_ok(st)) return fail(cudaErrorInvalidResourceHandle);
    if (!bytes) return cudaSuccess;
    if (kind == cudaMemcpyDefault)
        kind = g_mem.in_region(dst)
                   ? (g_mem.in_region(src) ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                   : (g_mem.in_region(src) ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    bool dev_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool dev_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    char w[96];
    snprintf(w, sizeof(w), "%s (%s)", what, kind_name(kind));
    if ((dev_dst ? !dev_range_ok(dst, bytes, w) : !host_range_ok(dst, w)) ||
        (dev_src ? !dev_range_ok(src, bytes, w) : !host_range_ok(src, w)))
        return fail(cudaErrorInvalidValue);
    kn_emu_stream *s = stream_of(st);
    if (!async && capture_refuses(what)) return fail(cudaErrorStreamCaptureUnsupported);
    if (async && s->capturing &&
        ((kind == cudaMemcpyHostToDevice && !g_mem.is_pinned(src)) ||
         (kind == cudaMemcpyDeviceToHost && !g_mem.is_pinned(dst)))) {
        complain("%s: pageable host memory in a stream capture", what);
        s->capture_bad = true;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (!async) { /* cudaMemcpy: in order on the legacy stream (non-blocking streams go on) */
        flush(&g_legacy);
        dev_access a;
        memmove(dst, src, bytes);
        return cudaSuccess;
    }
    if (kind == cudaMemcpyHostToDevice && !g_mem.is_pinned(src)) {
        /* from pageable memory: the source is read now, written when the stream runs */
        std::shared_ptr<std::vector<char>> tmp =
            std::make_shared<std::vector<char>>((const char *)src, (const char *)src + bytes);
        enqueue(st, [dst, tmp]() { memcpy(dst, tmp->data(), tmp->size()); });
        return cudaSuccess;
    }
    if (kind == cudaMemcpyDeviceToHost && !g_mem.is_pinned(dst)) {
        /* to pageable memory: returns once the copy is done */
        uint64_t seq = enqueue(st, [dst, src, bytes]() { memmove(dst, src, bytes); });
        flush_until(s, seq);
        return cudaSuccess;
    }
    enqueue(st, [dst, src, bytes]() { memmove(dst, src, bytes); });
    return cudaSuccess;
}

/* ---- kernel execution: fibers ---- */

enum fstate { F_READY, F_BLOCK, F_WARP, F_DONE };

struct fiber {
    void *sp;
    uint3 tid;
    unsigned lin, warp, lane;
    int state;
    uint64_t slot;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
};

const size_t STACK_BYTES = (size_t)256 << 10;
const unsigned MAX_THREADS = 1024;

std::vector<fiber> g_fib;
char *g_stacks;
fiber *g_cur;
void *g_sched_sp;
const std::function<void()> *g_body;
unsigned g_nthreads;
std::vector<char> g_smem;
const char *g_kernel_name = "";

/* ---- faults in device memory ---- */

struct sigaction g_old_segv;

/* KN_EMU_GUARD: an access that reached a guard page, named by the allocations around it */
void guard_fault(void *addr)
{
    char msg[512];
    uintptr_t a = (uintptr_t)addr;
    int n = 0;
    if (g_cur) /* inside a kernel */
        n = snprintf(msg, sizeof(msg),
                     "kn_emu: kernel %s, block (%u,%u,%u) thread %u: ", g_kernel_name,
                     kn_emu::block_idx.x, kn_emu::block_idx.y, kn_emu::block_idx.z, g_cur->lin);
    else
        n = snprintf(msg, sizeof(msg), "kn_emu: device work or host code: ");
    auto it = g_mem.live.upper_bound(a);
    if (it != g_mem.live.begin()) {
        auto below = std::prev(it);
        n += snprintf(msg + n, sizeof(msg) - (size_t)n,
                      "an access %zu bytes past the end of the device allocation at %p (%zu "
                      "bytes)",
                      (size_t)(a - below->first - below->second), (void *)below->first,
                      below->second);
    } else {
        n += snprintf(msg + n, sizeof(msg) - (size_t)n, "an access to %p", addr);
    }
    if (it != g_mem.live.end())
        n += snprintf(msg + n, sizeof(msg) - (size_t)n,
                      " (or %zu bytes before the one at %p, %zu bytes)", (size_t)(it->first - a),
                      (void *)it->first, it->second);
    n += snprintf(msg + n, sizeof(msg) - (size_t)n, ": outside every allocation\n");
    if (write(2, msg, (size_t)n) < 0) { /* nothing more to do */
    }
}

void on_segv(int sig, siginfo_t *si, void *uc)
{
    if (g_mem.in_region(si->si_addr)) {
        if (cfg().guard) {
            guard_fault(si->si_addr);
        } else {
            char msg[256];
            size_t off = (size_t)((char *)si->si_addr - g_mem.base);
            int n = snprintf(msg, sizeof(msg),
                             "kn_emu: host code touched device memory at %p (offset %zu of the "
                             "device region): a device pointer used as a host one\n",
                             si->si_addr, off);
            if (write(2, msg, (size_t)n) < 0) { /* nothing more to do */
            }
        }
        void *bt[32];
        int k = backtrace(bt, 32);
        backtrace_symbols_fd(bt, k, 2);
        signal(SIGSEGV, SIG_DFL);
        return; /* the access faults again, now fatally */
    }
    if (g_old_segv.sa_flags & SA_SIGINFO && g_old_segv.sa_sigaction) {
        g_old_segv.sa_sigaction(sig, si, uc);
        return;
    }
    if (g_old_segv.sa_handler != SIG_DFL && g_old_segv.sa_handler != SIG_IGN &&
        g_old_segv.sa_handler) {
        g_old_segv.sa_handler(sig);
        return;
    }
    signal(SIGSEGV, SIG_DFL);
}

void install_segv()
{
    static bool done;
    if (done) return;
    done = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
}

#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif

} // namespace

#if defined(__x86_64__)
/* saves the callee-saved registers on the current stack, stores its pointer in *save,
 * switches to `to` and restores what it saved there */
extern "C" void kn_emu_switch(void **save, void *to);
__asm__(".text\n"
        ".globl kn_emu_switch\n"
        ".hidden kn_emu_switch\n"
        ".type kn_emu_switch,@function\n"
        "kn_emu_switch:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size kn_emu_switch, .-kn_emu_switch\n");
#endif

namespace
{

void to_scheduler()
{
#if defined(__x86_64__)
    kn_emu_switch(&g_cur->sp, g_sched_sp);
#else
    swapcontext(&g_cur->uc, &g_sched_uc);
#endif
}

void to_fiber(fiber *f)
{
    g_cur = f;
#if defined(__x86_64__)
    kn_emu_switch(&g_sched_sp, f->sp);
#else
    swapcontext(&g_sched_uc, &f->uc);
#endif
    g_cur = nullptr;
}

void fiber_main()
{
    (*g_body)();
    g_cur->state = F_DONE;
    to_scheduler();
    __builtin_unreachable();
}

void fiber_init(fiber *f, unsigned i)
{
    char *top = g_stacks + (size_t)(i + 1) * STACK_BYTES;
#if defined(__x86_64__)
    void **sp = (void **)((uintptr_t)top & ~(uintptr_t)15);
    *--sp = nullptr;            /* fiber_main's return address: it never returns */
    *--sp = (void *)fiber_main; /* where kn_emu_switch's ret goes */
    for (int r = 0; r < 6; r++)
        *--sp = nullptr; /* rbp, rbx, r12-r15 */
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = top - STACK_BYTES;
    f->uc.uc_stack.ss_size = STACK_BYTES;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_main, 0);
#endif
}

void block_on(int state)
{
    if (!g_cur) fatal("a barrier or warp operation outside a kernel");
    g_cur->state = state;
    to_scheduler();
}

void run_block()
{
    unsigned n = g_nthreads;
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; i++) {
        fiber *f = &g_fib[i];
        f->lin = i;
        f->warp = i / 32;
        f->lane = i % 32;
        f->tid.x = i % kn_emu::block_dim.x;
        f->tid.y = (i / kn_emu::block_dim.x) % kn_emu::block_dim.y;
        f->tid.z = i / (kn_emu::block_dim.x * kn_emu::block_dim.y);
        f->state = F_READY;
        f->slot = 0;
        fiber_init(f, i);
        order[i] = i;
    }
    unsigned nwarps = (n + 31) / 32;
    for (;;) {
        if (cfg().order == ORDER_REVERSE)
            std::reverse(order.begin(), order.end());
        else if (cfg().order == ORDER_RANDOM)
            for (unsigned i = n; i > 1; i--)
                std::swap(order[i - 1], order[rng() % i]);
        for (unsigned k = 0; k < n; k++) {
            fiber *f = &g_fib[order[k]];
            if (f->state == F_READY) to_fiber(f);
        }
        unsigned live = 0, at_block = 0;
        for (unsigned i = 0; i < n; i++) {
            live += g_fib[i].state != F_DONE;
            at_block += g_fib[i].state == F_BLOCK;
        }
        if (!live) return;
        bool released = false;
        for (unsigned w = 0; w < nwarps; w++) {
            unsigned lv = 0, at = 0;
            for (unsigned i = w * 32; i < std::min(n, w * 32 + 32); i++) {
                lv += g_fib[i].state != F_DONE;
                at += g_fib[i].state == F_WARP;
            }
            if (lv && at == lv) {
                for (unsigned i = w * 32; i < std::min(n, w * 32 + 32); i++)
                    if (g_fib[i].state == F_WARP) g_fib[i].state = F_READY;
                released = true;
            }
        }
        if (!released && at_block == live) {
            for (unsigned i = 0; i < n; i++)
                if (g_fib[i].state == F_BLOCK) g_fib[i].state = F_READY;
            released = true;
        }
        if (!released) {
            unsigned wb = 0;
            for (unsigned i = 0; i < n; i++)
                wb += g_fib[i].state == F_WARP;
            fatal("kernel %s, block (%u,%u,%u): deadlock: of %u live threads %u wait at "
                  "__syncthreads and %u at a warp operation whose other lanes never come",
                  g_kernel_name, kn_emu::block_idx.x, kn_emu::block_idx.y, kn_emu::block_idx.z,
                  live, at_block, wb);
        }
    }
}

struct kernel_attr {
    int max_dyn_smem = 48 << 10;
};
std::map<const void *, kernel_attr> g_attr;
const int SMEM_OPTIN = 232448; /* Hopper: 227 KiB per block */

/* a launch waiting in its stream: the kernel and a copy of its arguments */
void run_launch(const char *name, dim3 grid, dim3 block, size_t smem,
                const std::function<void()> &body)
{
    if (!g_stacks) {
        void *p = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) fatal("no memory for the fiber stacks");
        g_stacks = (char *)p;
        g_fib.resize(MAX_THREADS);
    }
    kn_emu::grid_dim = grid;
    kn_emu::block_dim = block;
    g_nthreads = block.x * block.y * block.z;
    g_body = &body;
    g_kernel_name = name;
    g_smem.assign(smem + 128, (char)0xff);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                kn_emu::block_idx = uint3{x, y, z};
                std::fill(g_smem.begin(), g_smem.end(), (char)0xff);
                run_block();
            }
    g_body = nullptr;
    g_kernel_name = "";
}

} // namespace

/* ---- what the kernels see ---- */

namespace kn_emu
{

uint3 block_idx;
dim3 block_dim, grid_dim;

const uint3 &thread_idx()
{
    if (!g_cur) fatal("threadIdx read outside a kernel");
    return g_cur->tid;
}

void syncthreads()
{
    block_on(F_BLOCK);
}

void syncwarp()
{
    block_on(F_WARP);
}

uint64_t shfl_xor(uint64_t v, int lane_mask, unsigned mask)
{
    fiber *me = g_cur;
    if (!me) fatal("a shuffle outside a kernel");
    me->slot = v;
    block_on(F_WARP);
    /* every lane the mask names must be here: not past the block's end, not exited */
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        unsigned idx = me->warp * 32 + l;
        if (idx >= g_nthreads || g_fib[idx].state == F_DONE)
            fatal("kernel %s, block (%u,%u,%u): a shuffle whose mask names lane %u of warp %u, "
                  "which %s (undefined on a GPU)",
                  g_kernel_name, kn_emu::block_idx.x, kn_emu::block_idx.y, kn_emu::block_idx.z, l,
                  me->warp, idx >= g_nthreads ? "is past the block's last thread" : "has exited");
    }
    unsigned src = (me->lane ^ (unsigned)lane_mask) & 31u;
    if (!(mask >> src & 1u))
        fatal("kernel %s: a shuffle reads lane %u, outside its mask", g_kernel_name, src);
    uint64_t r = g_fib[me->warp * 32 + src].slot;
    block_on(F_WARP);
    return r;
}

void *dyn_smem()
{
    uintptr_t p = ((uintptr_t)g_smem.data() + 127) & ~(uintptr_t)127;
    return (void *)p;
}

static thread_local const char *t_arg_error;
static thread_local char t_arg_msg[256];
static thread_local std::vector<std::pair<int, int>> t_arg_devs; /* (argument, device) */

void arg_check(const void *kernel, const char *name, int index, const void *p)
{
    (void)kernel;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (uintptr_t o = p ? g_mem.owner(p, 0) : 0) {
        t_arg_devs.push_back({index, g_mem.dev_of[o]});
        return;
    }
    if (!p || g_mem.is_pinned(p)) return;
    snprintf(t_arg_msg, sizeof(t_arg_msg),
             "kernel %s: argument %d (%p) is %s, not device or pinned host memory", name, index, p,
             g_mem.in_region(p) ? "outside every device allocation" : "pageable host memory");
    t_arg_error = t_arg_msg;
}

cudaError_t launch(const void *kernel, const char *name, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, std::function<void()> body)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    std::vector<std::pair<int, int>> devs; /* what arg_check saw for this launch */
    devs.swap(t_arg_devs);
    if (t_arg_error) {
        const char *m = t_arg_error;
        t_arg_error = nullptr;
        fatal("%s", m); /* on a GPU: an illegal address, and every later call fails */
    }
    unsigned long threads = (unsigned long)block.x * block.y * block.z;
    if (!threads || threads > MAX_THREADS || block.z > 64 || !grid.x || !grid.y || !grid.z ||
        grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        complain("kernel %s: launch (%u,%u,%u) x (%u,%u,%u) is outside the device's limits", name,
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return fail(cudaErrorInvalidConfiguration);
    }
    int lim = g_attr.count(kernel) ? g_attr[kernel].max_dyn_smem : (48 << 10);
    if (smem > (size_t)lim) {
        complain("kernel %s: %zu bytes of dynamic shared memory, over its limit of %d "
                 "(cudaFuncAttributeMaxDynamicSharedMemorySize)",
                 name, smem, lim);
        return fail(cudaErrorInvalidValue);
    }
    if (!stream_ok(stream)) return fail(cudaErrorInvalidResourceHandle);
    /* a kernel runs on its stream's device, which must be the current one; memory of
     * another device needs peer access from this one */
    int sdev = stream_of(stream)->device;
    if (stream && sdev != g_device) {
        complain("kernel %s: launched on a stream of device %d while device %d is current", name,
                 sdev, g_device);
        return fail(cudaErrorInvalidResourceHandle);
    }
    for (const auto &ad : devs)
        if (ad.second != g_device && !g_peer.count({g_device, ad.second}))
            fatal("kernel %s on device %d: argument %d is memory of device %d without peer "
                  "access (an illegal address on a GPU)",
                  name, g_device, ad.first, ad.second);
    enqueue(stream, [name, grid, block, smem, body = std::move(body)]() {
        run_launch(name, grid, block, smem, body);
    });
    return cudaSuccess;
}

} // namespace kn_emu

/* ---- the runtime API ---- */

extern "C" {

EXPORT cudaError_t cudaGetDeviceCount(int *count)
{
    *count = cfg().devices;
    return cudaSuccess;
}

EXPORT cudaError_t cudaSetDevice(int device)
{
    if (device < 0 || device >= cfg().devices) return fail(cudaErrorInvalidDevice);
    g_device = device;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    g_mem.init();
    install_segv();
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetDevice(int *device)
{
    *device = g_device;
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device)
{
    if (device < 0 || device >= cfg().devices) return fail(cudaErrorInvalidDevice);
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "CPU emulator of an sm_90 device");
    p->totalGlobalMem = cfg().mem_bytes;
    p->sharedMemPerBlock = 48 << 10;
    p->sharedMemPerBlockOptin = SMEM_OPTIN;
    p->warpSize = 32;
    p->maxThreadsPerBlock = (int)MAX_THREADS;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    return cudaSuccess;
}

EXPORT cudaError_t cudaDeviceSynchronize(void)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaDeviceSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
    flush_all();
    return cudaSuccess;
}

EXPORT cudaError_t cudaDeviceCanAccessPeer(int *can, int device, int peer)
{
    *can = device != peer && device < cfg().devices && peer < cfg().devices;
    return cudaSuccess;
}

EXPORT cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    std::set<std::pair<int, int>> &enabled = g_peer;
    if (flags || peer < 0 || peer >= cfg().devices) return fail(cudaErrorInvalidValue);
    if (!enabled.insert({g_device, peer}).second) return fail(cudaErrorPeerAccessAlreadyEnabled);
    return cudaSuccess;
}

EXPORT cudaError_t cudaGetLastError(void)
{
    cudaError_t e = g_last;
    g_last = cudaSuccess;
    return e;
}

EXPORT cudaError_t cudaPeekAtLastError(void)
{
    return g_last;
}

EXPORT const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidConfiguration:
        return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection:
        return "invalid copy direction for memcpy";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
        return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
        return "invalid resource handle";
    case cudaErrorNotReady:
        return "device not ready";
    case cudaErrorPeerAccessAlreadyEnabled:
        return "peer access is already enabled";
    default:
        return "unspecified launch failure";
    }
}

EXPORT cudaError_t cudaMalloc(void **p, size_t bytes)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaMalloc")) return fail(cudaErrorStreamCaptureUnsupported);
    *p = g_mem.alloc(bytes);
    return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

EXPORT cudaError_t cudaFree(void *p)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaFree")) return fail(cudaErrorStreamCaptureUnsupported);
    if (!p) return cudaSuccess;
    flush_all(); /* cudaFree synchronises the device */
    if (!g_mem.release(p)) {
        complain("cudaFree(%p): not a device allocation", p);
        return fail(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

EXPORT cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags)
{
    (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaHostAlloc")) return fail(cudaErrorStreamCaptureUnsupported);
    size_t sz = (std::max<size_t>(bytes, 1) + 4095) & ~(size_t)4095;
    void *m = aligned_alloc(4096, sz);
    if (!m) return fail(cudaErrorMemoryAllocation);
    g_mem.pinned[(uintptr_t)m] = bytes;
    *p = m;
    return cudaSuccess;
}

EXPORT cudaError_t cudaFreeHost(void *p)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaFreeHost")) return fail(cudaErrorStreamCaptureUnsupported);
    if (!p) return cudaSuccess;
    flush_all();
    if (!g_mem.pinned.erase((uintptr_t)p)) {
        complain("cudaFreeHost(%p): not pinned memory", p);
        return fail(cudaErrorInvalidValue);
    }
    free(p);
    return cudaSuccess;
}

EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind)
{
    return copy(dst, src, bytes, kind, nullptr, false, "cudaMemcpy");
}

EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes,
                                   enum cudaMemcpyKind kind, cudaStream_t stream)
{
    return copy(dst, src, bytes, kind, stream, true, "cudaMemcpyAsync");
}

EXPORT cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                                     size_t width, size_t height, enum cudaMemcpyKind kind,
                                     cudaStream_t stream)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
    if (!height || !width) return cudaSuccess;
    if (kind != cudaMemcpyHostToDevice || !stream_ok(stream)) { /* the one use: rows upward */
        complain("cudaMemcpy2DAsync: only host-to-device copies are emulated");
        return fail(cudaErrorInvalidValue);
    }
    size_t span = (height - 1) * dpitch + width;
    if (!dev_range_ok(dst, span, "cudaMemcpy2DAsync") || !host_range_ok(src, "cudaMemcpy2DAsync"))
        return fail(cudaErrorInvalidValue);
    if (g_mem.is_pinned(src)) {
        enqueue(stream, [=]() {
            for (size_t r = 0; r < height; r++)
                memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
        });
        return cudaSuccess;
    }
    auto tmp = std::make_shared<std::vector<char>>(width * height);
    for (size_t r = 0; r < height; r++) /* pageable: read at the call */
        memcpy(tmp->data() + r * width, (const char *)src + r * spitch, width);
    enqueue(stream, [=]() {
        for (size_t r = 0; r < height; r++)
            memcpy((char *)dst + r * dpitch, tmp->data() + r * width, width);
    });
    return cudaSuccess;
}

EXPORT cudaError_t cudaMemcpyPeerAsync(void *dst, int dst_device, const void *src, int src_device,
                                       size_t bytes, cudaStream_t stream)
{
    if (dst_device < 0 || dst_device >= cfg().devices || src_device < 0 ||
        src_device >= cfg().devices)
        return fail(cudaErrorInvalidDevice);
    return copy(dst, src, bytes, cudaMemcpyDeviceToDevice, stream, true, "cudaMemcpyPeerAsync");
}

/* zeroing whole pages drops them instead (they read as zeros): the emulator's memory and
 * the cost of its protection changes grow with what device work touches, not with what
 * was cleared */
static void fill(void *p, int value, size_t bytes)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p, e = a + bytes;
    uintptr_t a1 = (a + page - 1) & ~(page - 1), e1 = e & ~(page - 1);
    if (value != 0 || e1 <= a1 + 16 * page) {
        memset(p, value, bytes);
        return;
    }
    memset(p, 0, a1 - a);
    madvise((void *)a1, e1 - a1, MADV_DONTNEED);
    memset((void *)e1, 0, e - e1);
}

static cudaError_t memset_impl(void *p, int value, size_t bytes, cudaStream_t st, bool async)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!stream_ok(st)) return fail(cudaErrorInvalidResourceHandle);
    if (!bytes) return cudaSuccess;
    if (!dev_range_ok(p, bytes, async ? "cudaMemsetAsync" : "cudaMemset"))
        return fail(cudaErrorInvalidValue);
    if (!async) {
        if (capture_refuses("cudaMemset")) return fail(cudaErrorStreamCaptureUnsupported);
        flush(&g_legacy);
        dev_access a;
        fill(p, value, bytes);
        return cudaSuccess;
    }
    enqueue(st, [p, value, bytes]() { fill(p, value, bytes); });
    return cudaSuccess;
}

EXPORT cudaError_t cudaMemset(void *p, int value, size_t bytes)
{
    return memset_impl(p, value, bytes, nullptr, false);
}

EXPORT cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t stream)
{
    return memset_impl(p, value, bytes, stream, true);
}

EXPORT cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    kn_emu_stream *st = new kn_emu_stream;
    st->device = g_device;
    g_streams.insert(st);
    *s = st;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!s || !g_streams.count(s)) return fail(cudaErrorInvalidResourceHandle);
    flush(s); /* its work still completes */
    for (kn_emu_event *e : g_events)
        if (e->stream == s) e->stream = nullptr;
    g_streams.erase(s);
    delete s;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaStreamSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
    if (!stream_ok(s)) return fail(cudaErrorInvalidResourceHandle);
    flush(stream_of(s));
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    kn_emu_event *ev = new kn_emu_event;
    g_events.insert(ev);
    *e = ev;
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!g_events.erase(e)) return fail(cudaErrorInvalidResourceHandle);
    delete e;
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (stream_of(s)->capturing) { /* not emulated: the backend captures no events */
        complain("cudaEventRecord on a capturing stream: not emulated");
        stream_of(s)->capture_bad = true;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (!g_events.count(e) || !stream_ok(s)) return fail(cudaErrorInvalidResourceHandle);
    kn_emu_stream *st = stream_of(s);
    e->stream = st;
    e->seq = enqueue(s, []() {});
    e->queried = false;
    return cudaSuccess;
}

static bool event_pending(cudaEvent_t e)
{
    return e->stream && e->stream->done < e->seq;
}

EXPORT cudaError_t cudaEventQuery(cudaEvent_t e)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaEventQuery")) return fail(cudaErrorStreamCaptureUnsupported);
    if (!g_events.count(e)) return fail(cudaErrorInvalidResourceHandle);
    if (!event_pending(e)) return cudaSuccess;
    /* the work runs now; this query still finds it pending, as a GPU's first one would */
    flush_until(e->stream, e->seq);
    return cudaErrorNotReady;
}

EXPORT cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (capture_refuses("cudaEventSynchronize")) return fail(cudaErrorStreamCaptureUnsupported);
    if (!g_events.count(e)) return fail(cudaErrorInvalidResourceHandle);
    if (event_pending(e)) flush_until(e->stream, e->seq);
    return cudaSuccess;
}

EXPORT cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
    (void)start;
    (void)end;
    *ms = 0.0f;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags)
{
    (void)flags;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (stream_of(s)->capturing) {
        complain("cudaStreamWaitEvent on a capturing stream: not emulated");
        stream_of(s)->capture_bad = true;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    if (!g_events.count(e) || !stream_ok(s)) return fail(cudaErrorInvalidResourceHandle);
    kn_emu_stream *other = e->stream;
    uint64_t seq = e->seq;
    if (!other || other->done >= seq) return cudaSuccess;
    /* when s reaches this point, the event's stream first runs up to the record */
    enqueue(s, [other, seq]() {
        if (g_streams.count(other) || other == &g_legacy) flush_until(other, seq);
    });
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    /* the legacy stream cannot capture; one capture per thread here */
    if (!s || !g_streams.count(s) || s->capturing || t_capturing ||
        mode != cudaStreamCaptureModeThreadLocal)
        return fail(cudaErrorInvalidValue);
    s->capturing = true;
    s->capture_bad = false;
    s->captured.clear();
    t_capturing = s;
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!s || !g_streams.count(s) || !s->capturing || t_capturing != s)
        return fail(cudaErrorInvalidValue);
    s->capturing = false;
    t_capturing = nullptr;
    *graph = nullptr;
    std::vector<std::function<void()>> ops;
    ops.swap(s->captured);
    if (s->capture_bad) return fail(cudaErrorStreamCaptureInvalidated);
    *graph = new kn_emu_graph{std::move(ops)};
    return cudaSuccess;
}

EXPORT cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus *status)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    kn_emu_stream *st = stream_of(s);
    *status = !st->capturing    ? cudaStreamCaptureStatusNone
              : st->capture_bad ? cudaStreamCaptureStatusInvalidated
                                : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}

EXPORT cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph,
                                        unsigned long long flags)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!graph || flags) return fail(cudaErrorInvalidValue);
    *exec = new kn_emu_graph_exec{
        std::make_shared<const std::vector<std::function<void()>>>(graph->ops)};
    return cudaSuccess;
}

EXPORT cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!exec || !stream_ok(s)) return fail(cudaErrorInvalidValue);
    if (stream_of(s)->capturing) {
        complain("cudaGraphLaunch into a capture: not emulated");
        stream_of(s)->capture_bad = true;
        return fail(cudaErrorStreamCaptureUnsupported);
    }
    auto ops = exec->ops;
    enqueue(s, [ops]() {
        for (const auto &op : *ops)
            op();
    });
    return cudaSuccess;
}

EXPORT cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec)
{
    delete exec;
    return cudaSuccess;
}

EXPORT cudaError_t cudaGraphDestroy(cudaGraph_t graph)
{
    delete graph;
    return cudaSuccess;
}

EXPORT cudaError_t kn_emu_func_set_attribute(const void *func, enum cudaFuncAttribute attr,
                                             int value)
{
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > SMEM_OPTIN)
        return fail(cudaErrorInvalidValue);
    g_attr[func].max_dyn_smem = value;
    return cudaSuccess;
}

} /* extern "C" */

/* ---- cuBLASLt ---- */

struct kn_emu_lt {
    int magic;
};

struct kn_emu_lt_desc {
    cublasComputeType_t compute;
    cudaDataType_t scale_type;
    int transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
    int a_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F,
        b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    const float *a_scale = nullptr, *b_scale = nullptr;
};

struct kn_emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
};

struct kn_emu_lt_pref {
    size_t ws;
};

namespace
{

float elem(const void *p, cudaDataType_t t, size_t i)
{
    switch (t) {
    case CUDA_R_32F:
        return ((const float *)p)[i];
    case CUDA_R_16BF: {
        __nv_bfloat16 h;
        h.__x = ((const uint16_t *)p)[i];
        return __bfloat162float(h);
    }
    case CUDA_R_8F_E4M3: {
        __half_raw r = __nv_cvt_fp8_to_halfraw(((const uint8_t *)p)[i], __NV_E4M3);
        return __half2float(__half(r));
    }
    default:
        return NAN;
    }
}

size_t scale_index(int order, int64_t outer, int64_t inner, int64_t o, int64_t kb)
{
    if (order == 1) return (size_t)(o * inner + kb);
    int64_t ld = order == 0 ? (outer + 3) / 4 * 4 : outer;
    return (size_t)(kb * ld + o);
}

bool is_fp8(const kn_emu_lt_desc *d, const kn_emu_lt_layout *a, const kn_emu_lt_layout *b)
{
    return a->type == CUDA_R_8F_E4M3 || b->type == CUDA_R_8F_E4M3 ||
           d->a_scale_mode != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F ||
           d->b_scale_mode != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
}

/* the combinations the emulator has an algorithm for */
bool supported(const kn_emu_lt_desc *d, const kn_emu_lt_layout *a, const kn_emu_lt_layout *b,
               const kn_emu_lt_layout *c)
{
    if (d->compute != CUBLAS_COMPUTE_32F) return false;
    uint64_t M = d->transa == CUBLAS_OP_T ? a->cols : a->rows;
    uint64_t K = d->transa == CUBLAS_OP_T ? a->rows : a->cols;
    uint64_t Kb = d->transb == CUBLAS_OP_T ? b->cols : b->rows;
    uint64_t N = d->transb == CUBLAS_OP_T ? b->rows : b->cols;
    if (K != Kb || c->rows != M || c->cols != N) return false;
    if (!is_fp8(d, a, b))
        return a->type == CUDA_R_16BF && b->type == CUDA_R_16BF && c->type == CUDA_R_32F;
    /* block-scaled fp8: TN only, whole 128 blocks along K, bf16 out */
    return cfg().fp8 && a->type == CUDA_R_8F_E4M3 && b->type == CUDA_R_8F_E4M3 &&
           c->type == CUDA_R_16BF && d->transa == CUBLAS_OP_T && d->transb == CUBLAS_OP_N &&
           d->a_scale_mode == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F &&
           d->b_scale_mode == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F && K % 128 == 0;
}

} // namespace

extern "C" {

EXPORT cublasStatus_t cublasLtCreate(cublasLtHandle_t *h)
{
    *h = new kn_emu_lt{0x4c54};
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtDestroy(cublasLtHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                               cudaDataType_t scale_type)
{
    *d = new kn_emu_lt_desc;
    (*d)->compute = compute;
    (*d)->scale_type = scale_type;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d)
{
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                                     cublasLtMatmulDescAttributes_t attr,
                                                     const void *buf, size_t size)
{
    int32_t v = 0;
    const void *p = nullptr;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
    case CUBLASLT_MATMUL_DESC_A_SCALE_MODE:
    case CUBLASLT_MATMUL_DESC_B_SCALE_MODE:
        if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&v, buf, 4);
        break;
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER:
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&p, buf, sizeof(p));
        break;
    default:
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (attr == CUBLASLT_MATMUL_DESC_TRANSA) d->transa = v;
    if (attr == CUBLASLT_MATMUL_DESC_TRANSB) d->transb = v;
    if (attr == CUBLASLT_MATMUL_DESC_A_SCALE_MODE) d->a_scale_mode = v;
    if (attr == CUBLASLT_MATMUL_DESC_B_SCALE_MODE) d->b_scale_mode = v;
    if (attr == CUBLASLT_MATMUL_DESC_A_SCALE_POINTER) d->a_scale = (const float *)p;
    if (attr == CUBLASLT_MATMUL_DESC_B_SCALE_POINTER) d->b_scale = (const float *)p;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type,
                                                 uint64_t rows, uint64_t cols, int64_t ld)
{
    if (ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE; /* column-major */
    *l = new kn_emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l)
{
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p)
{
    *p = new kn_emu_lt_pref{0};
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p)
{
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulPreferenceSetAttribute(
    cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
    size_t size)
{
    if (attr != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES || size != sizeof(size_t))
        return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&p->ws, buf, sizeof(size_t));
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl, cublasLtMatmulPreference_t pref,
    int requested, cublasLtMatmulHeuristicResult_t *results, int *found)
{
    (void)h;
    (void)pref;
    *found = 0;
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    if (c->type != dl->type || c->rows != dl->rows || c->cols != dl->cols)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!supported(d, a, b, c)) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(&results[0], 0, sizeof(results[0]));
    results[0].algo.data[0] = 0x454d55; /* "EMU" */
    results[0].state = CUBLAS_STATUS_SUCCESS;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha,
                                     const void *A, cublasLtMatrixLayout_t a, const void *B,
                                     cublasLtMatrixLayout_t b, const void *beta, const void *C,
                                     cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t dl,
                                     const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_bytes,
                                     cudaStream_t stream)
{
    (void)h;
    (void)ws;
    (void)ws_bytes;
    std::lock_guard<std::recursive_mutex> lk(g_mu);
    if (!algo || algo->data[0] != 0x454d55 || !supported(d, a, b, c) || c->type != dl->type)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (!stream_ok(stream)) return CUBLAS_STATUS_INVALID_VALUE;
    /* what the call says now (a descriptor may change before the stream runs) */
    kn_emu_lt_desc dd = *d;
    kn_emu_lt_layout la = *a, lb = *b, lc = *c, ld = *dl;
    float al = *(const float *)alpha, be = *(const float *)beta;
    bool fp8 = is_fp8(&dd, &la, &lb);
    uint64_t M = dd.transa == CUBLAS_OP_T ? la.cols : la.rows;
    uint64_t K = dd.transa == CUBLAS_OP_T ? la.rows : la.cols;
    uint64_t N = dd.transb == CUBLAS_OP_T ? lb.rows : lb.cols;
    size_t esz_a = la.type == CUDA_R_32F ? 4 : la.type == CUDA_R_16BF ? 2 : 1;
    size_t esz_b = lb.type == CUDA_R_32F ? 4 : lb.type == CUDA_R_16BF ? 2 : 1;
    size_t esz_d = ld.type == CUDA_R_32F ? 4 : 2;
    if (!dev_range_ok(A, (size_t)la.ld * (la.cols - 1) * esz_a + la.rows * esz_a, "matmul A") ||
        !dev_range_ok(B, (size_t)lb.ld * (lb.cols - 1) * esz_b + lb.rows * esz_b, "matmul B") ||
        !dev_range_ok(D, (size_t)ld.ld * (ld.cols - 1) * esz_d + ld.rows * esz_d, "matmul D") ||
        (fp8 && (!dd.a_scale || !dd.b_scale)))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (fp8 && (!g_mem.owner(dd.a_scale, 4) || !g_mem.owner(dd.b_scale, 4))) {
        complain("matmul: a scale pointer is not device memory");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    int ow = cfg().scale_w, ox = cfg().scale_x;
    enqueue(stream, [=]() {
        int64_t KB = (int64_t)(K + 127) / 128, MB = (int64_t)(M + 127) / 128;
        std::vector<float> opa((size_t)M * K), opb((size_t)K * N);
        for (uint64_t m = 0; m < M; m++)
            for (uint64_t k = 0; k < K; k++) {
                size_t i = dd.transa == CUBLAS_OP_T ? k + m * la.ld : m + k * la.ld;
                float v = elem(A, la.type, i);
                if (fp8)
                    v *= dd.a_scale[scale_index(ow, MB, KB, (int64_t)m / 128, (int64_t)k / 128)];
                opa[m * K + k] = v;
            }
        for (uint64_t n = 0; n < N; n++)
            for (uint64_t k = 0; k < K; k++) {
                size_t i = dd.transb == CUBLAS_OP_T ? n + k * lb.ld : k + n * lb.ld;
                float v = elem(B, lb.type, i);
                if (fp8)
                    v *= dd.b_scale[scale_index(ox, (int64_t)N, KB, (int64_t)n, (int64_t)k / 128)];
                opb[n * K + k] = v;
            }
        for (uint64_t n = 0; n < N; n++)
            for (uint64_t m = 0; m < M; m++) {
                const float *x = &opa[m * K], *y = &opb[n * K];
                float s = 0.0f; /* float32 accumulation, as the tensor cores */
                for (uint64_t k = 0; k < K; k++)
                    s += x[k] * y[k];
                size_t ci = m + n * lc.ld, di = m + n * ld.ld;
                float r = al * s + (be != 0.0f ? be * elem(C, lc.type, ci) : 0.0f);
                if (ld.type == CUDA_R_32F)
                    ((float *)D)[di] = r;
                else
                    ((uint16_t *)D)[di] = __float2bfloat16_rn(r).__x;
            }
    });
    return CUBLAS_STATUS_SUCCESS;
}

} /* extern "C" */
