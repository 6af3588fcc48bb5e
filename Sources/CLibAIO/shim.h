/*
 * CLibAIO: libaio plus the few Linux block/file calls blkback needs that Swift
 * cannot reach directly (ioctls with _IO macros, fallocate flags, RWF_*).
 * Helpers are `static inline` and prefixed `clibaio_`.
 */
#ifndef CLIBAIO_SHIM_H
#define CLIBAIO_SHIM_H

/* No _GNU_SOURCE here: it would change glibc's struct definitions against the
 * other C modules (fd_set's members); the two GNU-only names are supplied below. */
#include <libaio.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <sys/eventfd.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <sys/syscall.h>
#include <linux/stat.h>

/* fcntl.h declares these only under _GNU_SOURCE. */
#ifndef O_DIRECT
#define CLIBAIO_O_DIRECT_VALUE 040000 /* x86_64 */
#else
#define CLIBAIO_O_DIRECT_VALUE O_DIRECT
#endif
extern int fallocate(int fd, int mode, off_t offset, off_t len);

/* Fills a whole iocb (zeroing it first) for PREAD/PWRITE/PREADV/PWRITEV/FDSYNC,
 * with completion signalled on `eventfd` and `data` echoed in the io_event.
 * For the vector opcodes `buf` is the iovec array and `count` the iovec count. */
static inline void clibaio_prep(struct iocb *cb, int opcode, int fd, void *buf,
                                unsigned long count, long long offset, int rw_flags,
                                int eventfd, uint64_t data) {
    memset(cb, 0, sizeof(*cb));
    cb->data = (void *)(uintptr_t)data;
    cb->aio_rw_flags = (unsigned)rw_flags;
    cb->aio_lio_opcode = (short)opcode;
    cb->aio_fildes = fd;
    cb->u.c.buf = buf;
    cb->u.c.nbytes = count;
    cb->u.c.offset = offset;
    if (eventfd >= 0) io_set_eventfd(cb, eventfd);
}

/* The completion ring the kernel maps at the io_context_t address (fs/aio.c
 * struct aio_ring). Completions can be taken from it without a syscall, as
 * fio's userspace_reap does; the kernel honours the head we store. */
struct clibaio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
    struct io_event events[];
};
#define CLIBAIO_RING_MAGIC 0xa10a10a1

/* Takes up to `max` ready completions from the mapped ring; -1 when the ring
 * is not in the known format (then use io_getevents). */
static inline int clibaio_user_reap(io_context_t ctx, struct io_event *out, int max) {
    struct clibaio_ring *r = (struct clibaio_ring *)ctx;
    if (r->magic != CLIBAIO_RING_MAGIC || r->incompat_features != 0) return -1;
    unsigned head = r->head, n = 0;
    while ((int)n < max) {
        unsigned tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
        if (head == tail) break;
        out[n++] = r->events[head];
        head = (head + 1) % r->nr;
    }
    if (n) __atomic_store_n(&r->head, head, __ATOMIC_RELEASE);
    return (int)n;
}

/* 1 when the mapped completion ring holds an event (or its format is unknown). */
static inline int clibaio_ready(io_context_t ctx) {
    struct clibaio_ring *r = (struct clibaio_ring *)ctx;
    if (r->magic != CLIBAIO_RING_MAGIC) return 1;
    return __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE) != r->head;
}

static inline uint64_t clibaio_event_data(const struct io_event *e) { return (uint64_t)(uintptr_t)e->data; }
static inline long clibaio_event_res(const struct io_event *e) { return (long)e->res; }

static const int CLIBAIO_CMD_PREADV = IO_CMD_PREADV;
static const int CLIBAIO_CMD_PWRITEV = IO_CMD_PWRITEV;
static const int CLIBAIO_CMD_FDSYNC = IO_CMD_FDSYNC;
static const int CLIBAIO_RWF_DSYNC = RWF_DSYNC;
static const int CLIBAIO_O_DIRECT = CLIBAIO_O_DIRECT_VALUE;

/* BLKGETSIZE64: a block device's size in bytes; -1 with errno on failure. */
static inline int clibaio_blkgetsize64(int fd, uint64_t *bytes) { return ioctl(fd, BLKGETSIZE64, bytes); }
/* BLKSSZGET: logical sector size. */
static inline int clibaio_blksszget(int fd, int *size) { return ioctl(fd, BLKSSZGET, size); }
/* The file-offset alignment O_DIRECT needs on `fd` (statx's STATX_DIOALIGN,
 * Linux 6.1), or 0 where the kernel or the filesystem does not say. A file on
 * a filesystem over 4 KiB-sector storage needs 4096, not 512. */
static inline unsigned clibaio_dio_offset_align(int fd) {
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    if (syscall(SYS_statx, fd, "", 0x1000 /* AT_EMPTY_PATH */, STATX_DIOALIGN, &stx) != 0) return 0;
    return (stx.stx_mask & STATX_DIOALIGN) ? stx.stx_dio_offset_align : 0;
}
/* BLKDISCARD / BLKSECDISCARD over [start, start+len) bytes. */
static inline int clibaio_blkdiscard(int fd, uint64_t start, uint64_t len, int secure) {
    uint64_t range[2] = { start, len };
    return ioctl(fd, secure ? BLKSECDISCARD : BLKDISCARD, range);
}
/* Punches a hole in a regular file, keeping its size. */
static inline int clibaio_punch_hole(int fd, uint64_t start, uint64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)start, (off_t)len);
}
static inline int clibaio_errno(void) { return errno; }
/* Gives freed heap back to the kernel (glibc keeps it in its arenas otherwise). */
static inline int clibaio_malloc_trim(void) { return malloc_trim(0); }

#endif
