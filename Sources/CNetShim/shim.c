#define _GNU_SOURCE
#include "CNetShim.h"
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <netlink/netlink.h>
#include <netlink/errno.h>
#include <netlink/route/link.h>
#include <netlink/route/link/bridge.h>
#include <netlink/route/link/veth.h>

int cnet_tap_open(const char *name, int multiqueue, int exclusive, char *actual) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (multiqueue ? IFF_MULTI_QUEUE : 0) | (exclusive ? IFF_TUN_EXCL : 0);
    if (strlen(name) >= IFNAMSIZ) { close(fd); return -ENAMETOOLONG; }
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { int e = errno; close(fd); return -e; }
    if (actual) { memcpy(actual, ifr.ifr_name, IFNAMSIZ); actual[IFNAMSIZ - 1] = 0; }
    return fd;
}

int cnet_tap_set_offload(int fd, unsigned int flags) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0 ? -errno : 0;
}

int cnet_tap_set_vnet_hdr_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size) < 0 ? -errno : 0;
}

int cnet_tap_set_carrier(int fd, int on) {
    return ioctl(fd, TUNSETCARRIER, &on) < 0 ? -errno : 0;
}

int cnet_tap_get_flags(int fd) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -errno;
    return ifr.ifr_flags & 0xffff;
}

ssize_t cnet_writev(int fd, const struct iovec *iov, int iovcnt) {
    ssize_t n;
    do { n = writev(fd, iov, iovcnt); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

ssize_t cnet_readv(int fd, const struct iovec *iov, int iovcnt) {
    ssize_t n;
    do { n = readv(fd, iov, iovcnt); } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}


unsigned int cnet_ifindex(const char *name) { return if_nametoindex(name); }

struct nl_sock *cnet_nl_open(void) {
    struct nl_sock *sk = nl_socket_alloc();
    if (!sk) return NULL;
    if (nl_connect(sk, NETLINK_ROUTE) < 0) { nl_socket_free(sk); return NULL; }
    return sk;
}

void cnet_nl_close(struct nl_sock *sk) { if (sk) nl_socket_free(sk); }

const char *cnet_nl_error(int err) { return nl_geterror(err); }

int cnet_nl_bridge_add(struct nl_sock *sk, const char *name) {
    return rtnl_link_bridge_add(sk, name);
}

static int get_link(struct nl_sock *sk, const char *name, struct rtnl_link **out) {
    if (strlen(name) >= IFNAMSIZ) return -NLE_INVAL;
    return rtnl_link_get_kernel(sk, 0, name, out);
}

int cnet_nl_link_del(struct nl_sock *sk, const char *name) {
    struct rtnl_link *link;
    int err = get_link(sk, name, &link);
    if (err < 0) return err;
    err = rtnl_link_delete(sk, link);
    rtnl_link_put(link);
    return err;
}

int cnet_nl_enslave(struct nl_sock *sk, const char *dev, const char *bridge) {
    struct rtnl_link *d, *b;
    int err = get_link(sk, dev, &d);
    if (err < 0) return err;
    err = get_link(sk, bridge, &b);
    if (err < 0) { rtnl_link_put(d); return err; }
    const char *kind = rtnl_link_get_type(b);
    if (!kind || strcmp(kind, "bridge") != 0) err = -NLE_OPNOTSUPP;
    else err = rtnl_link_enslave_ifindex(sk, rtnl_link_get_ifindex(b), rtnl_link_get_ifindex(d));
    rtnl_link_put(d);
    rtnl_link_put(b);
    return err;
}

int cnet_nl_release(struct nl_sock *sk, const char *dev) {
    struct rtnl_link *d;
    int err = get_link(sk, dev, &d);
    if (err < 0) return err;
    err = rtnl_link_release_ifindex(sk, rtnl_link_get_ifindex(d));
    rtnl_link_put(d);
    return err;
}

static int change(struct nl_sock *sk, const char *dev, void (*fill)(struct rtnl_link *, const void *), const void *arg) {
    struct rtnl_link *orig;
    int err = get_link(sk, dev, &orig);
    if (err < 0) return err;
    struct rtnl_link *ch = rtnl_link_alloc();
    if (!ch) { rtnl_link_put(orig); return -NLE_NOMEM; }
    fill(ch, arg);
    err = rtnl_link_change(sk, orig, ch, 0);
    rtnl_link_put(ch);
    rtnl_link_put(orig);
    return err;
}

static void fill_mtu(struct rtnl_link *l, const void *a) { rtnl_link_set_mtu(l, *(const unsigned int *)a); }
static void fill_up(struct rtnl_link *l, const void *a) {
    if (*(const int *)a) rtnl_link_set_flags(l, IFF_UP); else rtnl_link_unset_flags(l, IFF_UP);
}
static void fill_addr(struct rtnl_link *l, const void *a) {
    struct nl_addr *addr = nl_addr_build(AF_LLC, a, 6);
    if (addr) { rtnl_link_set_addr(l, addr); nl_addr_put(addr); }
}

int cnet_nl_set_mtu(struct nl_sock *sk, const char *dev, unsigned int mtu) {
    return change(sk, dev, fill_mtu, &mtu);
}
int cnet_nl_set_up(struct nl_sock *sk, const char *dev, int up) {
    return change(sk, dev, fill_up, &up);
}
int cnet_nl_set_address(struct nl_sock *sk, const char *dev, const uint8_t mac[6]) {
    return change(sk, dev, fill_addr, mac);
}

int cnet_nl_veth_add(struct nl_sock *sk, const char *name, const char *peer) {
    return rtnl_link_veth_add(sk, name, peer, getpid());
}

int cnet_nl_link_info(struct nl_sock *sk, const char *dev, int *ifindex, int *master,
                      unsigned int *mtu, unsigned int *flags, uint8_t *carrier,
                      char *kind, size_t kindlen) {
    struct rtnl_link *l;
    int err = get_link(sk, dev, &l);
    if (err < 0) return err;
    if (ifindex) *ifindex = rtnl_link_get_ifindex(l);
    if (master) *master = rtnl_link_get_master(l);
    if (mtu) *mtu = rtnl_link_get_mtu(l);
    if (flags) *flags = rtnl_link_get_flags(l);
    if (carrier) *carrier = rtnl_link_get_carrier(l);
    if (kind && kindlen) {
        const char *k = rtnl_link_get_type(l);
        strncpy(kind, k ? k : "", kindlen - 1);
        kind[kindlen - 1] = 0;
    }
    rtnl_link_put(l);
    return 0;
}
