#ifndef CNETSHIM_H
#define CNETSHIM_H
/* tun/tap ioctls and virtio_net_hdr for netback. */
#endif
