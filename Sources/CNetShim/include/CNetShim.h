#ifndef CNETSHIM_H
#define CNETSHIM_H
/*
 * CNetShim: tun/tap ioctls, struct virtio_net_hdr and netlink helpers for
 * netback. Everything Swift cannot reach directly (ioctl request macros,
 * struct ifreq, libnl's error strings and macros) is wrapped here with the
 * cnet_ prefix. Functions return a negative errno (or negative libnl error)
 * on failure, never set global state Swift has to read.
 */
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>
#include <linux/if_tun.h>

/* struct virtio_net_hdr as the tap reads and writes it (10 bytes, native endian on x86). */
typedef struct virtio_net_hdr cnet_vnet_hdr;

static const uint8_t CNET_VNET_F_NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM;
static const uint8_t CNET_VNET_F_DATA_VALID = VIRTIO_NET_HDR_F_DATA_VALID;
static const uint8_t CNET_VNET_GSO_NONE = VIRTIO_NET_HDR_GSO_NONE;
static const uint8_t CNET_VNET_GSO_TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4;
static const uint8_t CNET_VNET_GSO_UDP = VIRTIO_NET_HDR_GSO_UDP;
static const uint8_t CNET_VNET_GSO_TCPV6 = VIRTIO_NET_HDR_GSO_TCPV6;
static const uint8_t CNET_VNET_GSO_ECN = VIRTIO_NET_HDR_GSO_ECN;

static const unsigned int CNET_TUN_F_CSUM = TUN_F_CSUM;
static const unsigned int CNET_TUN_F_TSO4 = TUN_F_TSO4;
static const unsigned int CNET_TUN_F_TSO6 = TUN_F_TSO6;
static const unsigned int CNET_TUN_F_TSO_ECN = TUN_F_TSO_ECN;

/* Opens /dev/net/tun and attaches to (or creates) tap `name` with
 * IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus IFF_MULTI_QUEUE when `multiqueue`;
 * with `exclusive` (IFF_TUN_EXCL) only creates: a device of that name that
 * exists already is -EBUSY. The descriptor is non-blocking and close-on-exec.
 * The kernel's name for the device is written to `actual` (IFNAMSIZ bytes).
 * Returns fd or -errno. */
int cnet_tap_open(const char *name, int multiqueue, int exclusive, char *actual);
/* TUNSETOFFLOAD with TUN_F_* bits. 0 or -errno. */
int cnet_tap_set_offload(int fd, unsigned int flags);
/* TUNSETVNETHDRSZ. 0 or -errno. */
int cnet_tap_set_vnet_hdr_size(int fd, int size);
/* TUNSETCARRIER (Linux >= 5.0). 0 or -errno. */
int cnet_tap_set_carrier(int fd, int on);
/* TUNGETIFF: IFF_* flags the queue was opened with, or -errno. */
int cnet_tap_get_flags(int fd);
/* writev that returns bytes or -errno. */
ssize_t cnet_writev(int fd, const struct iovec *iov, int iovcnt);
/* readv that returns bytes or -errno. */
ssize_t cnet_readv(int fd, const struct iovec *iov, int iovcnt);

/* if_nametoindex, 0 when there is no such device. */
unsigned int cnet_ifindex(const char *name);

/* ---- libnl-route-3 operations (one netlink socket per call site) ---- */
struct nl_sock;
/* A connected NETLINK_ROUTE socket, or NULL. */
struct nl_sock *cnet_nl_open(void);
void cnet_nl_close(struct nl_sock *sk);
/* libnl's message for a negative libnl error code. */
const char *cnet_nl_error(int err);
/* All return 0 or a negative libnl error (NLE_*). */
int cnet_nl_bridge_add(struct nl_sock *sk, const char *name);
int cnet_nl_link_del(struct nl_sock *sk, const char *name);
int cnet_nl_enslave(struct nl_sock *sk, const char *dev, const char *bridge);
int cnet_nl_release(struct nl_sock *sk, const char *dev);
int cnet_nl_set_mtu(struct nl_sock *sk, const char *dev, unsigned int mtu);
int cnet_nl_set_up(struct nl_sock *sk, const char *dev, int up);
int cnet_nl_set_address(struct nl_sock *sk, const char *dev, const uint8_t mac[6]);
int cnet_nl_veth_add(struct nl_sock *sk, const char *name, const char *peer);
/* Link facts: fills what is non-NULL. 0 or negative libnl error
 * (-NLE_OBJ_NOTFOUND when there is no such device). master is 0 when none. */
int cnet_nl_link_info(struct nl_sock *sk, const char *dev, int *ifindex, int *master,
                      unsigned int *mtu, unsigned int *flags, uint8_t *carrier,
                      char *kind, size_t kindlen);

#endif
