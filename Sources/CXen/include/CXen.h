/*
 * CXen: the thin C shim between Swift and Debian's libxen-dev headers.
 *
 * The Xen ABI is imported from /usr/include/xen, never copied. This header
 * only (1) fixes the interface version the headers need to expose the v1
 * grant structures, (2) supplies the barriers ring.h expects, and (3) wraps
 * macros and atomics Swift cannot import as `static inline` functions with
 * the `cxen_` prefix.
 */
#ifndef CXEN_H
#define CXEN_H

#ifndef __XEN_INTERFACE_VERSION__
#define __XEN_INTERFACE_VERSION__ 0x00040d00
#endif

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sys/types.h>

/* ring.h leaves the barriers to the includer (Linux: virt_mb and friends). */
#ifndef xen_mb
#define xen_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/memory.h>
#include <xen/sched.h>
#include <xen/version.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/xs_wire.h>
#include <xen/io/xenbus.h>
#include <xen/io/console.h>
#include <xen/io/protocols.h>

/* ---- Constants that are macros Swift cannot see as typed values ---- */

static const uint32_t CXEN_PAGE_SIZE = 4096;
static const uint32_t CXEN_PAGE_SHIFT = 12;

/* ---- Atomics on shared memory (guest-visible words) ----
 * Every access to a word the peer can change goes through these, so the
 * compiler can neither tear, fuse nor re-read it. */

static inline uint32_t cxen_load_acquire_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint32_t cxen_load_relaxed_u32(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void cxen_store_release_u32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline void cxen_store_relaxed_u32(volatile uint32_t *p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline uint16_t cxen_load_acquire_u16(const volatile uint16_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void cxen_store_release_u16(volatile uint16_t *p, uint16_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* Returns 1 on success; *expected receives the current value on failure. */
static inline int cxen_cas_u16(volatile uint16_t *p, uint16_t *expected, uint16_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cxen_cas_u32(volatile uint32_t *p, uint32_t *expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int cxen_cas_u64(volatile uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t cxen_load_acquire_u64(const volatile uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void cxen_store_release_u64(volatile uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t cxen_fetch_or_u64(volatile uint64_t *p, uint64_t v) {
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
static inline uint64_t cxen_fetch_and_u64(volatile uint64_t *p, uint64_t v) {
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
}
static inline uint16_t cxen_fetch_and_u16(volatile uint16_t *p, uint16_t v) {
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
}
static inline uint32_t cxen_load_acquire_u32_of_u16pair(const volatile uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint8_t cxen_exchange_u8(volatile uint8_t *p, uint8_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
static inline void cxen_store_release_u8(volatile uint8_t *p, uint8_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
/* xen_mb(): full barrier, as ring.h uses between publishing and checking the event index. */
static inline void cxen_mb(void) { xen_mb(); }
static inline void cxen_rmb(void) { xen_rmb(); }
static inline void cxen_wmb(void) { xen_wmb(); }

/* A copy through volatile, as RING_COPY_REQUEST does: the compiler may not
 * re-read the source after this returns (XSA-155). */
static inline void cxen_copy_from_shared(void *dst, const volatile void *src, size_t n) {
    const volatile unsigned char *s = (const volatile unsigned char *)src;
    unsigned char *d = (unsigned char *)dst;
    if (n == 8) { *(uint64_t *)d = *(const volatile uint64_t *)s; return; }
    memcpy(d, (const void *)s, n);
    __asm__ __volatile__("" ::: "memory");
}

/* ---- Ring geometry, computed by ring.h's own macros ---- */
static inline unsigned int cxen_blkif_ring_size(size_t bytes) {
    return __CONST_RING_SIZE(blkif, bytes);
}
static inline unsigned int cxen_netif_tx_ring_size(size_t bytes) {
    return __CONST_RING_SIZE(netif_tx, bytes);
}
static inline unsigned int cxen_netif_rx_ring_size(size_t bytes) {
    return __CONST_RING_SIZE(netif_rx, bytes);
}
static inline size_t cxen_sring_header_size(void) {
    return offsetof(struct blkif_sring, ring);
}

/* ---- Linux syscalls and ioctls Swift cannot reach directly ---- */
int cxen_memfd_create(const char *name, unsigned int flags);
/* Seals a memfd (made with MFD_ALLOW_SEALING) at its size: F_SEAL_SHRINK,
   F_SEAL_GROW and F_SEAL_SEAL, so no holder can resize it (which would turn
   other holders' accesses beyond the new end into SIGBUS) or add seals.
   0 on success, -1 (errno set) on error. cxen_memfd_size_sealed reports
   whether all three seals are in place (1), not (0), or -1 on error. */
int cxen_memfd_seal_size(int fd);
int cxen_memfd_size_sealed(int fd);
int cxen_eventfd(unsigned int initval, int flags);
/* For a plain eventfd whose file description another holder may share (and
   so change its mode with fcntl): reads the counter back to zero without
   ever blocking (preadv2 RWF_NOWAIT, per call; poll + read on kernels
   without it) and returns what it read, 0 when there was nothing. Event
   channels' descriptors are never shared across domains (wake-up sets,
   below); cxen_port_drain falls back to this for a test's stand-in eventfd. */
uint64_t cxen_evtfd_drain(int fd);
/* Event-channel ports (xenhv): a port's owner holds a wake-up set, an epoll
   instance holding one eventfd per sender, edge-triggered; each sender holds
   its own eventfd, which no other domain holds. Nobody can write the set, and
   nobody shares a sender's file description, so a signal is one non-blocking
   write and a drain one epoll_wait, and no domain can make either block.
   cxen_wake_create makes a set (-1 on error); cxen_wake_add registers an
   eventfd in it (EPOLLIN | EPOLLET; 0 or -1); cxen_wake_remove takes it out.
   cxen_port_signal adds 1 to a sender eventfd (1 when written, 0 when not).
   cxen_port_drain consumes a wake-up set's edges without blocking and
   returns how many senders had signalled (0: none). Given a plain eventfd
   (test harnesses stand one in for a port) it drains it as
   cxen_evtfd_drain does and returns 1 when it held a count. */
int cxen_wake_create(void);
/* The same, made with `uid` as the real uid (the kernel charges the watches
   anyone adds to it to that user, fs.epoll.max_user_watches): a set handed to
   a guest counts against the guest's own quota, not xenhv's. Needs root;
   without it the set is made as by cxen_wake_create. */
int cxen_wake_create_as(unsigned int uid);
int cxen_wake_add(int wake, int fd);
void cxen_wake_remove(int wake, int fd);
int cxen_port_signal(int fd);
int cxen_port_drain(int fd);
/* sendmsg/recvmsg with SCM_RIGHTS. Return bytes or -1 (errno set). */
ssize_t cxen_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* As above, but never blocks (MSG_DONTWAIT): a full peer gets EAGAIN. */
ssize_t cxen_send_with_fds_nowait(int sock, const void *buf, size_t len, const int *fds, int nfds);
/* recvmsg with SCM_RIGHTS: returns bytes or -1 (errno set; EAGAIN with
   `nowait` when nothing is queued, MSG_DONTWAIT). Every descriptor that came
   is in fds (the ones past maxfds are closed), a 0-byte record's too. A
   return of 0 is the end of the stream only when *eof is 1; with *eof 0 it
   is an empty record (SOCK_SEQPACKET keeps record boundaries). */
ssize_t cxen_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int nowait, int *eof);
/* From now on, descriptors a peer sent are closed on a thread of their own
   (cxen_close_received): the last close of some files (a socket lingering
   on unsent data, a FUSE file) waits as long as whoever made them likes.
   0 or -errno. */
int cxen_defer_closes(void);
/* Closes a descriptor a peer sent: at once, or on the closer thread after
   cxen_defer_closes. */
void cxen_close_received(int fd);
/* SO_PASSRIGHTS off (Linux 6.16): the peer's sendmsg with SCM_RIGHTS fails
   (EPERM) and nothing reaches us. 0 or -errno (ENOPROTOOPT before 6.16). */
int cxen_refuse_descriptors(int sock);
/* 1 when process `pid` is in the PID namespace (`dev`, `ino` of its
   /proc/PID/ns/pid link) or in one nested in it, else 0. */
int cxen_pid_ns_within(int pid, unsigned long long dev, unsigned long long ino);
/* Names the calling thread (prctl PR_SET_NAME; at most 15 bytes are kept), so
   top -H, perf and /proc/<pid>/task/<tid>/comm tell the threads apart. */
void cxen_set_thread_name(const char *name);

/* Whether descriptors `a` and `b` of this process refer to the same open file
   (kcmp KCMP_FILE): 1 yes, 0 no, -1 with errno (EBADF: one is not open). Exact
   where /proc's view is not: fd numbers and eventfd ids are both reused
   lowest-first. */
int cxen_same_file(int a, int b);

/* A signalfd for SIGTERM, SIGINT and SIGHUP, which it also blocks; -1 on error. */
/* SIGINT, SIGTERM and SIGHUP only set a flag (cxen_termination_noted),
   without SA_RESTART, so a command in a bounded wait sees it and undoes what
   it made instead of dying half-way. 0 or -errno. */
int cxen_note_termination(void);
/* Unblocks SIGINT, SIGTERM and SIGHUP in the calling thread. 0 or -errno. */
int cxen_termination_unblock(void);
int cxen_termination_noted(void);
int cxen_termination_signalfd(void);
/* SIGINT, SIGTERM and SIGHUP each write their number (one byte) to a pipe
   whose read end (close-on-exec, blocking) this returns, or -errno. With
   SA_RESTART, and nothing blocked: a child gets default dispositions and the
   mask it would have had. */
int cxen_termination_pipe(void);
/* A non-blocking signalfd for `n` signals, which it also blocks; -1 on error. */
int cxen_signalfd(const int *signals, int n);
/* The signal number of one pending signalfd record, or -1 when none. */
int cxen_signalfd_read(int fd);
/* posix_spawn_file_actions_addclosefrom_np: the child closes every fd >= `from`. */
int cxen_spawn_closefrom(void *file_actions, int from);
/* The calling thread's CPU affinity (sched_getaffinity/sched_setaffinity on
 * itself) as a bitmap of CXEN_CPU_WORDS 64-bit words, CPU n at bit n % 64 of
 * word n / 64. 0, or -1 with errno. A child it spawns inherits it. */
#define CXEN_CPU_WORDS 16
int cxen_thread_affinity(uint64_t mask[CXEN_CPU_WORDS]);
int cxen_set_thread_affinity(const uint64_t mask[CXEN_CPU_WORDS]);
/* pidfd_open(pid, 0) and pidfd_send_signal(pidfd, sig, NULL, 0) through
   syscall(2). A pidfd names one process for good: once that process is
   reaped, signals fail with ESRCH, even when its pid went to another. */
int cxen_pidfd_open(int pid);
int cxen_pidfd_send_signal(int pidfd, int sig);
/* SO_PEERCRED pid of a Unix-socket peer, or -1. */
int cxen_peer_pid(int sock);

/* Starts a guest process confined as libxl confines a device model with
 * dm_restrict, with a user namespace in place of a chroot: clone into a PID
 * namespace of its own (whatever it starts dies with it), then in the child
 * default signal dispositions and an empty mask, a mount namespace (a slave
 * of the caller's) with a /proc of the child's PID namespace, setsid when
 * `new_session`, dup2(from[i], to[i]) for `count` pairs (the sources must be
 * close-on-exec and above every target), every descriptor >= `close_from`
 * close-on-exec, no supplementary groups, gid and uid `gid`/`uid` (every
 * capability gone), PR_SET_NO_NEW_PRIVS, the working directory /, then unshare(CLONE_NEWUSER |
 * CLONE_NEWNET) with uid/gid 0 inside mapped to `uid`/`gid` outside: the
 * child holds CAP_NET_ADMIN over its own network namespace only. When
 * `netns_mount` is set (an existing empty file) the parent bind-mounts the
 * child's namespace there (`ip netns` naming) before the child execs.
 * `path` is opened by the caller's credentials and executed through that
 * descriptor (execveat), so the child need not reach the directories above
 * it; an ELF program, not a script. Hard limits the child cannot raise
 * (it has no capability in the initial user namespace): RLIMIT_FSIZE
 * `max_file_size` (SIGXFSZ ignored, so a write past it fails with EFBIG
 * rather than killing it) and RLIMIT_NPROC `max_processes` (for its uid);
 * 0 leaves a limit as it is.
 * 0 and *pid_out, or an errno (the child, if one was made, is reaped). */
int cxen_spawn_confined(const char *path, char *const argv[], char *const envp[],
                        const int *from, const int *to, int count, int close_from, int new_session,
                        unsigned uid, unsigned gid, const char *netns_mount,
                        uint64_t max_file_size, uint64_t max_processes, int *pid_out, int *failed_step);
/* The step of cxen_spawn_confined that failed (*failed_step with its errno). */
enum {
    CXEN_CONFINE_SETUP = 1,    /* descriptors, session, working directory, prctl */
    CXEN_CONFINE_CREDENTIALS,  /* setgroups, setresgid, setresuid */
    CXEN_CONFINE_LIMITS,       /* setrlimit */
    CXEN_CONFINE_NAMESPACES,   /* clone3(CLONE_NEWPID), unshare(CLONE_NEWUSER | CLONE_NEWNET) */
    CXEN_CONFINE_ID_MAPS,      /* setgroups deny, gid_map, uid_map */
    CXEN_CONFINE_NAME,         /* the bind mount naming the network namespace */
    CXEN_CONFINE_EXEC,         /* opening or executing the program */
    CXEN_CONFINE_PROC,         /* unshare(CLONE_NEWNS) and making it a slave */
};
/* Starts `path` as posix_spawn does for ProcessLauncher.spawn (fork and
 * execve: default signal dispositions and an empty mask, setsid when
 * `new_session`, dup2(from[i], to[i]) for `count` pairs whose sources are
 * close-on-exec and above every target, every descriptor >= `close_from`
 * close-on-exec), and tied to the calling thread with PR_SET_PDEATHSIG
 * SIGKILL: it is killed when that thread ends or this process dies, kill -9
 * included. 0 and *pid_out, or an errno (the child, if one was made, is
 * reaped). */
int cxen_spawn_tied(const char *path, char *const argv[], char *const envp[],
                    const int *from, const int *to, int count, int close_from, int new_session, int *pid_out);
/* setns(2) for a namespace type (CLONE_NEW*); 0 or -1 with errno. */
int cxen_setns(int fd, int nstype);
/* unshare(2); 0 or -1 with errno. */
int cxen_unshare(int flags);

#endif /* CXEN_H */
