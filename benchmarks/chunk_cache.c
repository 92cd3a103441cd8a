/* A measuring instrument for benchmarks/stage_overhead.py, not part of nemo-ft.
 *
 * CPython 3.11 and 3.12 keep each thread's Python frames in 16 KiB "data stack" chunks. A chunk is
 * mmap'ed when a call does not fit in the current one and munmap'ed when that frame returns, so a
 * loop whose callee lands just past a chunk boundary maps and unmaps 16 KiB (and page-faults it in)
 * on every call: CPython issue gh-142183, fixed in 3.13 and 3.14 by keeping one chunk per thread
 * (gh-145789, gh-146123). Which loops hit a boundary depends on how deep the training loop starts, so
 * one more Python frame under the trainer can move a process's step time by 10% on a small model.
 *
 * LD_PRELOAD this into a process and it counts the anonymous 16 KiB maps it makes; with
 * CHUNK_CACHE=1 it also keeps up to 64 of them on munmap and hands them out again (zeroed) on the
 * next mmap of that size, which is what CPython's fix does. Only maps this library handed out are
 * kept, never a file mapping. At exit it writes "<maps> <reuses>" to $CHUNK_CACHE_LOG if set.
 *
 *     cc -O2 -shared -fPIC -o chunk_cache.so chunk_cache.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHUNK 16384
#define KEEP 64
#define SLOTS 8192
#define TOMB ((void *)1)

static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static void *ours[SLOTS]; /* open addressing: the anonymous 16 KiB maps handed out and not yet unmapped */
static void *kept[KEEP];
static int nkept, caching = -1;
static unsigned long maps, reuses;

static size_t slot(void *p) { return ((uintptr_t)p / CHUNK) % SLOTS; }

static void **find(void *p) {
    for (size_t i = slot(p), n = 0; n < SLOTS && ours[i]; i = (i + 1) % SLOTS, n++)
        if (ours[i] == p) return &ours[i];
    return NULL;
}

static void remember(void *p) {
    for (size_t i = slot(p), n = 0; n < SLOTS; i = (i + 1) % SLOTS, n++)
        if (!ours[i] || ours[i] == TOMB) { ours[i] = p; return; }
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    if (!real_mmap) real_mmap = dlsym(RTLD_NEXT, "mmap");
    if (addr || len != CHUNK || fd != -1 || flags != (MAP_PRIVATE | MAP_ANONYMOUS) || prot != (PROT_READ | PROT_WRITE))
        return real_mmap(addr, len, prot, flags, fd, off);
    pthread_mutex_lock(&lock);
    if (caching < 0) caching = getenv("CHUNK_CACHE") && strcmp(getenv("CHUNK_CACHE"), "1") == 0;
    void *p = nkept ? kept[--nkept] : NULL;
    if (p) reuses++;
    pthread_mutex_unlock(&lock);
    if (p) { memset(p, 0, CHUNK); return p; }
    p = real_mmap(addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED) { pthread_mutex_lock(&lock); remember(p); maps++; pthread_mutex_unlock(&lock); }
    return p;
}

/* glibc's mmap is mmap64 for code built with 64-bit file offsets (libpython is) */
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) { return mmap(addr, len, prot, flags, fd, off); }

int munmap(void *addr, size_t len) {
    if (!real_munmap) real_munmap = dlsym(RTLD_NEXT, "munmap");
    if (len == CHUNK) {
        pthread_mutex_lock(&lock);
        void **at = find(addr);
        if (at && caching == 1 && nkept < KEEP) { kept[nkept++] = addr; pthread_mutex_unlock(&lock); return 0; }
        if (at) *at = TOMB;
        pthread_mutex_unlock(&lock);
    }
    return real_munmap(addr, len);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("CHUNK_CACHE_LOG");
    if (!path) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    char line[64];
    int n = snprintf(line, sizeof line, "%lu %lu\n", maps, reuses);
    if (n > 0) (void)!write(fd, line, (size_t)n);
    close(fd);
}
