#define _GNU_SOURCE
#include "CXen.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <signal.h>
#include <sched.h>
#include <spawn.h>
#include <sys/signalfd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/kcmp.h>
#include <grp.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

int cxen_memfd_create(const char *name, unsigned int flags) {
    return memfd_create(name, flags);
}

int cxen_memfd_seal_size(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
}

int cxen_memfd_size_sealed(int fd) {
    int s = fcntl(fd, F_GET_SEALS);
    if (s < 0) return -1;
    int want = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    return (s & want) == want;
}

int cxen_eventfd(unsigned int initval, int flags) {
    return eventfd(initval, flags);
}

uint64_t cxen_evtfd_drain(int fd) {
    uint64_t v = 0;
    struct iovec iov = { .iov_base = &v, .iov_len = sizeof v };
    ssize_t r = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
    if (r == (ssize_t)sizeof v) return v;
    if (r < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
        struct pollfd p = { .fd = fd, .events = POLLIN, .revents = 0 };
        if (poll(&p, 1, 0) == 1 && (p.revents & POLLIN) && read(fd, &v, sizeof v) == (ssize_t)sizeof v) return v;
    }
    return 0;
}

int cxen_wake_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

int cxen_wake_create_as(unsigned int uid) {
    /* The kernel charges an epoll instance's watches to the real uid of its
       creator (ep->user), whoever adds them. This thread takes `uid` as its
       real uid for the one call (the raw system call changes this thread
       only; the effective uid, root, stays, so it can take its own back). */
    uid_t r = getuid();
    if (syscall(SYS_setresuid, (long)uid, -1L, -1L) != 0) return epoll_create1(EPOLL_CLOEXEC);
    int fd = epoll_create1(EPOLL_CLOEXEC);
    int err = errno;
    if (syscall(SYS_setresuid, (long)r, -1L, -1L) != 0) abort();  /* never go on as someone else */
    errno = err;
    return fd;
}

int cxen_wake_add(int wake, int fd) {
    struct epoll_event e = { .events = EPOLLIN | EPOLLET, .data = { .fd = fd } };
    return epoll_ctl(wake, EPOLL_CTL_ADD, fd, &e);
}

void cxen_wake_remove(int wake, int fd) {
    (void)epoll_ctl(wake, EPOLL_CTL_DEL, fd, NULL);
}

int cxen_port_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one;
}

int cxen_port_drain(int fd) {
    struct epoll_event e[8];
    int n = epoll_wait(fd, e, 8, 0);
    if (n >= 0) return n;
    if (errno == EINVAL) return cxen_evtfd_drain(fd) > 0;
    return 0;
}

#define CXEN_MAX_FDS 16

static ssize_t send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags);

ssize_t cxen_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    return send_fds(sock, buf, len, fds, nfds, MSG_NOSIGNAL);
}

ssize_t cxen_send_with_fds_nowait(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    return send_fds(sock, buf, len, fds, nfds, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static ssize_t send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags) {
    if (nfds < 0 || nfds > CXEN_MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { char buf[CMSG_SPACE(sizeof(int) * CXEN_MAX_FDS)]; struct cmsghdr align; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        memset(&u, 0, sizeof(u));
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t r;
    do { r = sendmsg(sock, &msg, flags); } while (r < 0 && errno == EINTR);
    return r;
}

/* Descriptors a hostile peer sent, closed on a thread of their own: closing
   the last reference to a socket with SO_LINGER and unsent data, or to a
   FUSE file, can wait for as long as that peer likes, and a single-threaded
   daemon must not. The thread is started at the first one. */
static int deferred_pipe[2] = { -1, -1 };
static int deferring = 0;
static pthread_once_t deferring_once = PTHREAD_ONCE_INIT;
static int deferring_error = 0;

static void *closer_main(void *arg) {
    (void)arg;
    int fd;
    for (;;) {
        ssize_t n = read(deferred_pipe[0], &fd, sizeof fd);
        if (n == (ssize_t)sizeof fd) close(fd);
        else if (n < 0 && errno != EINTR) return NULL;
    }
}

static void start_closer(void) {
    if (pipe2(deferred_pipe, O_CLOEXEC) != 0) { deferring_error = errno; return; }
    (void)fcntl(deferred_pipe[1], F_SETFL, O_NONBLOCK);
    /* The closer takes no signals: they stay the caller's business. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    int r = pthread_create(&t, &a, closer_main, NULL);
    pthread_attr_destroy(&a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0) { close(deferred_pipe[0]); close(deferred_pipe[1]); deferring_error = r; return; }
    __atomic_store_n(&deferring, 1, __ATOMIC_RELEASE);
}

int cxen_defer_closes(void) {
    pthread_once(&deferring_once, start_closer);
    return __atomic_load_n(&deferring, __ATOMIC_ACQUIRE) ? 0 : -deferring_error;
}

void cxen_close_received(int fd) {
    if (!__atomic_load_n(&deferring, __ATOMIC_ACQUIRE)) { close(fd); return; }
    /* A full pipe means the closer is stuck on one already: the descriptor
       stays open (bounded by RLIMIT_NOFILE) rather than stall the caller. */
    (void)write(deferred_pipe[1], &fd, sizeof fd);
}

int cxen_pid_ns_within(int pid, unsigned long long dev, unsigned long long ino) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/pid", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    /* Up the namespace tree (NS_GET_PARENT) until the one asked for, or the
       top: the initial namespace's parent, and any outside ours, is EPERM. */
    for (int depth = 0; depth < 40; depth++) {
        struct stat st;
        if (fstat(fd, &st) != 0) break;
        if ((unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino) { close(fd); return 1; }
        int parent = ioctl(fd, _IO(0xb7, 0x2) /* NS_GET_PARENT */);
        close(fd);
        if (parent < 0) return 0;
        fd = parent;
    }
    close(fd);
    return 0;
}

int cxen_refuse_descriptors(int sock) {
#ifndef SO_PASSRIGHTS
#define SO_PASSRIGHTS 83
#endif
    int off = 0;
    return setsockopt(sock, SOL_SOCKET, SO_PASSRIGHTS, &off, sizeof off) == 0 ? 0 : -errno;
}

ssize_t cxen_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int nowait, int *eof) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    /* Room for as many as one record can carry (SCM_MAX_FD): whatever does
       not fit would be closed by the kernel in this thread. */
    union { char buf[CMSG_SPACE(sizeof(int) * 253)]; struct cmsghdr align; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
    *nfds = 0;
    *eof = 0;
    ssize_t r;
    do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | (nowait ? MSG_DONTWAIT : 0)); } while (r < 0 && errno == EINTR);
    if (r < 0) return r;
    /* Descriptors are collected whatever the length: a zero-length record
       can carry them too, and the kernel has installed them already. */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *in = (int *)CMSG_DATA(c);
        for (int i = 0; i < n; i++) {
            if (*nfds < maxfds) fds[(*nfds)++] = in[i];
            else cxen_close_received(in[i]); /* never leak a descriptor we cannot return */
        }
    }
    /* On SOCK_SEQPACKET (and datagram) sockets 0 is also the length of an
       empty record. It is the end of the stream only when nothing came with
       it and the peer can send no more (it closed or shut down its writing
       side: RCV_SHUTDOWN, which poll reports as POLLRDHUP). */
    if (r == 0 && msg.msg_controllen == 0 && !(msg.msg_flags & MSG_CTRUNC)) {
        struct pollfd p = { .fd = sock, .events = POLLRDHUP, .revents = 0 };
        if (poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP))) *eof = 1;
    }
    return r;
}

int cxen_pidfd_open(int pid) {
    return (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
}

int cxen_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

int cxen_peer_pid(int sock) {
    struct ucred cred;
    socklen_t l = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &l) != 0) return -1;
    return cred.pid;
}

/* SIGINT, SIGTERM and SIGHUP: what a daemon stops on and a command undoes on. */
static void termination_set(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGHUP);
}

int cxen_termination_unblock(void) {
    sigset_t set;
    termination_set(&set);
    int r = pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return r == 0 ? 0 : -r;
}

static volatile sig_atomic_t termination_noted = 0;
static void note_termination(int sig) { (void)sig; termination_noted = 1; }

int cxen_note_termination(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = note_termination;  /* no SA_RESTART: a wait in poll(2) returns EINTR */
    sigemptyset(&sa.sa_mask);
    int r = 0;
    r |= sigaction(SIGINT, &sa, NULL);
    r |= sigaction(SIGTERM, &sa, NULL);
    r |= sigaction(SIGHUP, &sa, NULL);
    if (r != 0) return -errno;
    /* A mask inherited from whoever started us must not hold them back. */
    return cxen_termination_unblock();
}

int cxen_termination_noted(void) { return termination_noted; }

int cxen_termination_signalfd(void) {
    sigset_t set;
    termination_set(&set);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

static int termination_pipe_w = -1;
static void write_termination(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    (void)!write(termination_pipe_w, &b, 1);
    errno = saved;
}

int cxen_termination_pipe(void) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return -errno;
    termination_pipe_w = p[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = write_termination;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0 || sigaction(SIGHUP, &sa, NULL) != 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        return -e;
    }
    int r = cxen_termination_unblock();
    return r == 0 ? p[0] : r;
}

int cxen_signalfd(const int *signals, int n) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < n; i++) sigaddset(&set, signals[i]);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) return -1;
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}

int cxen_signalfd_read(int fd) {
    struct signalfd_siginfo si;
    ssize_t r = read(fd, &si, sizeof(si));
    if (r != (ssize_t)sizeof(si)) return -1;
    return (int)si.ssi_signo;
}

int cxen_spawn_closefrom(void *file_actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)file_actions, from);
}

int cxen_thread_affinity(uint64_t mask[CXEN_CPU_WORDS]) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    for (int w = 0; w < CXEN_CPU_WORDS; w++) {
        mask[w] = 0;
        for (int b = 0; b < 64; b++)
            if (CPU_ISSET(w * 64 + b, &set)) mask[w] |= (uint64_t)1 << b;
    }
    return 0;
}

int cxen_set_thread_affinity(const uint64_t mask[CXEN_CPU_WORDS]) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int n = 0; n < CXEN_CPU_WORDS * 64; n++)
        if (mask[n / 64] >> (n % 64) & 1) CPU_SET(n, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

int cxen_same_file(int a, int b) {
    pid_t me = getpid();
    long r = syscall(SYS_kcmp, me, me, KCMP_FILE, a, b);
    return r < 0 ? -1 : r == 0;
}

void cxen_set_thread_name(const char *name) {
    char buf[16];
    size_t i = 0;
    for (; name[i] != 0 && i < sizeof buf - 1; i++) buf[i] = name[i];
    buf[i] = 0;
    prctl(PR_SET_NAME, (unsigned long)buf, 0, 0, 0);
}

int cxen_setns(int fd, int nstype) { return setns(fd, nstype); }
int cxen_unshare(int flags) { return unshare(flags); }

/* The child's side of cxen_spawn_confined: only system calls between clone and
 * exec (the parent is multithreaded). A failed step reports its errno on
 * `report` and exits. */
static int confined_write_file(const char *path, const char *text, size_t len) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, len);
    int e = errno;
    close(fd);
    if (n != (ssize_t)len) { errno = n < 0 ? e : EIO; return -1; }
    return 0;
}

static void confined_fail(int report, int step) {
    int e = (step << 16) | ((errno ? errno : EIO) & 0xffff);
    (void)!write(report, &e, sizeof e);
    _exit(127);
}

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* In a forked child: default dispositions for every signal (`ignore_xfsz`:
   SIGXFSZ ignored) and an empty mask. Async-signal-safe. */
static void child_default_signals(int ignore_xfsz) {
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++) if (s != SIGKILL && s != SIGSTOP) (void)sigaction(s, &dfl, NULL);
    if (ignore_xfsz) {
        struct sigaction ign = {0};
        ign.sa_handler = SIG_IGN;
        (void)sigaction(SIGXFSZ, &ign, NULL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

/* In a forked child: setsid when asked, dup2(from[i], to[i]), every
   descriptor >= close_from close-on-exec. 0, or -1 with errno. */
static int child_descriptors(int new_session, const int *from, const int *to, int count, int close_from) {
    if (new_session && setsid() < 0) return -1;
    for (int i = 0; i < count; i++) if (dup2(from[i], to[i]) < 0) return -1;
    return syscall(SYS_close_range, (unsigned)close_from, ~0U, CLOSE_RANGE_CLOEXEC) != 0 ? -1 : 0;
}


int cxen_spawn_confined(const char *path, char *const argv[], char *const envp[],
                        const int *from, const int *to, int count, int close_from, int new_session,
                        unsigned uid, unsigned gid, const char *netns_mount,
                        uint64_t max_file_size, uint64_t max_processes, int *pid_out, int *failed_step) {
    char uid_map[32], gid_map[32], ns_path[48];
    int uid_len = snprintf(uid_map, sizeof uid_map, "0 %u 1\n", uid);
    int gid_len = snprintf(gid_map, sizeof gid_map, "0 %u 1\n", gid);
    /* report: child -> parent (0 = namespaces made, else errno; EOF = exec'd);
       go: parent -> child, once the namespace is named. Both above every
       target slot, so no dup2 in the child lands on them. */
    /* exe: the program, opened here and executed through its descriptor, so
       the child needs no search permission on the directories above it (a
       build tree in a 0700 home or mktemp directory). */
    int p[2], g[2], report[2] = {-1, -1}, go[2] = {-1, -1}, exe = -1;
    *failed_step = CXEN_CONFINE_EXEC;
    int e0 = open(path, O_PATH | O_CLOEXEC);
    if (e0 < 0) return errno;
    *failed_step = CXEN_CONFINE_SETUP;
    if (pipe2(p, O_CLOEXEC) != 0) { int e = errno; close(e0); return e; }
    if (pipe2(g, O_CLOEXEC) != 0) { int e = errno; close(e0); close(p[0]); close(p[1]); return e; }
    int raw[5] = {p[0], p[1], g[0], g[1], e0}, *moved[5] = {&report[0], &report[1], &go[0], &go[1], &exe};
    int err = 0;
    for (int i = 0; i < 5; i++) {
        *moved[i] = fcntl(raw[i], F_DUPFD_CLOEXEC, 100);
        if (*moved[i] < 0 && !err) err = errno;
        close(raw[i]);
    }
    if (err) {
        for (int i = 0; i < 5; i++) if (*moved[i] >= 0) close(*moved[i]);
        return err;
    }
    /* clone3 in place of fork: the child is init of a PID namespace of its
       own, so everything it ever starts dies with it (the kernel kills a
       namespace's processes when its init exits). glibc does not know about
       this child, so the child uses raw system calls where glibc would
       touch other threads (setresuid and friends broadcast to every thread
       glibc believes in). */
    struct {
        uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    } args = {0};
    args.flags = CLONE_NEWPID;
    args.exit_signal = SIGCHLD;
    pid_t pid = (pid_t)syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) {
        err = errno;
        *failed_step = CXEN_CONFINE_NAMESPACES;
        for (int i = 0; i < 5; i++) close(*moved[i]);
        return err;
    }
    if (pid == 0) {
        child_default_signals(max_file_size != 0);
        close(report[0]);
        close(go[1]);
        errno = 0;
        /* A /proc of its own PID namespace, mounted while the child is still
           root: the host's /proc names the host's processes, so a tid the
           child reads from gettid() would name another process there, or
           none (libdispatch's worker monitor reads /proc/<tid>/stat and
           traps when it is missing). The mount namespace follows the host's
           (slave): a name removed under /run/netns goes here too. Where the
           kernel refuses a new proc (a host that is itself a container
           whose /proc is masked: "too revealing"), the guest keeps the
           host's /proc, as it did before it had its own. */
        if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
            confined_fail(report[1], CXEN_CONFINE_PROC);
        (void)mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        if (child_descriptors(new_session, from, to, count, close_from) != 0) confined_fail(report[1], CXEN_CONFINE_SETUP);
        if (syscall(SYS_setgroups, 0, NULL) != 0 || syscall(SYS_setresgid, gid, gid, gid) != 0
            || syscall(SYS_setresuid, uid, uid, uid) != 0)
            confined_fail(report[1], CXEN_CONFINE_CREDENTIALS);
        /* A changed uid makes the process non-dumpable, which leaves its
           /proc/self files to root: the maps below could not be written. */
        if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
            confined_fail(report[1], CXEN_CONFINE_SETUP);
        struct rlimit fsize = {max_file_size, max_file_size}, nproc = {max_processes, max_processes};
        if ((max_file_size && setrlimit(RLIMIT_FSIZE, &fsize) != 0) || (max_processes && setrlimit(RLIMIT_NPROC, &nproc) != 0))
            confined_fail(report[1], CXEN_CONFINE_LIMITS);
        /* Not left in the caller's directory, which it may not reach. */
        if (chdir("/") != 0) confined_fail(report[1], CXEN_CONFINE_SETUP);
        if (unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0) confined_fail(report[1], CXEN_CONFINE_NAMESPACES);
        if (confined_write_file("/proc/self/setgroups", "deny", 4) != 0
            || confined_write_file("/proc/self/gid_map", gid_map, (size_t)gid_len) != 0
            || confined_write_file("/proc/self/uid_map", uid_map, (size_t)uid_len) != 0)
            confined_fail(report[1], CXEN_CONFINE_ID_MAPS);
        if (netns_mount) {
            int ready = 0;
            char b = 0;
            if (write(report[1], &ready, sizeof ready) != sizeof ready) _exit(127);
            if (read(go[0], &b, 1) != 1) _exit(127);  /* the parent gave up */
        }
        syscall(SYS_execveat, exe, "", argv, envp, AT_EMPTY_PATH);
        confined_fail(report[1], CXEN_CONFINE_EXEC);
    }
    close(exe);
    close(report[1]);
    close(go[0]);
    int status = -1;
    ssize_t n;
    if (netns_mount) {
        do n = read(report[0], &status, sizeof status); while (n < 0 && errno == EINTR);
        if (n == sizeof status && status == 0) {
            snprintf(ns_path, sizeof ns_path, "/proc/%d/ns/net", (int)pid);
            if (mount(ns_path, netns_mount, "none", MS_BIND, NULL) != 0) {
                err = errno;
                *failed_step = CXEN_CONFINE_NAME;
            } else if (write(go[1], "g", 1) != 1) {
                err = errno;
                umount2(netns_mount, MNT_DETACH);
            }
        } else if (n == sizeof status) {
            err = status & 0xffff;
            *failed_step = status >> 16;
        } else {
            err = EIO;
        }
    }
    close(go[1]);
    if (!err) {
        do n = read(report[0], &status, sizeof status); while (n < 0 && errno == EINTR);
        if (n == sizeof status) {
            err = (status & 0xffff) ? (status & 0xffff) : EIO;
            *failed_step = status >> 16;
            if (netns_mount) umount2(netns_mount, MNT_DETACH);
        }
    }
    close(report[0]);
    if (err) {
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        return err;
    }
    *pid_out = pid;
    return 0;
}

int cxen_spawn_tied(const char *path, char *const argv[], char *const envp[],
                    const int *from, const int *to, int count, int close_from, int new_session, int *pid_out) {
    /* report: child -> parent, the errno of a failed step (EOF: exec'd);
       above every target slot, so no dup2 in the child lands on it. */
    int p[2], report[2];
    if (pipe2(p, O_CLOEXEC) != 0) return errno;
    report[0] = fcntl(p[0], F_DUPFD_CLOEXEC, 100);
    report[1] = fcntl(p[1], F_DUPFD_CLOEXEC, 100);
    int err = (report[0] < 0 || report[1] < 0) ? errno : 0;
    close(p[0]);
    close(p[1]);
    if (err) {
        if (report[0] >= 0) close(report[0]);
        if (report[1] >= 0) close(report[1]);
        return err;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        err = errno;
        close(report[0]);
        close(report[1]);
        return err;
    }
    if (pid == 0) {
        child_default_signals(0);
        close(report[0]);
        errno = 0;
        /* Set, then checked: a parent gone before the prctl sent nothing. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) confined_fail(report[1], 0);
        if (getppid() != parent) _exit(127);
        if (child_descriptors(new_session, from, to, count, close_from) != 0) confined_fail(report[1], 0);
        execve(path, argv, envp);
        confined_fail(report[1], 0);
    }
    close(report[1]);
    int e = 0;
    ssize_t n;
    while ((n = read(report[0], &e, sizeof e)) < 0 && errno == EINTR) {}
    close(report[0]);
    if (n == (ssize_t)sizeof e) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        return (e & 0xffff) ? (e & 0xffff) : EIO;
    }
    *pid_out = pid;
    return 0;
}
