/* A threaded blkif front end made of ring.h macros, and eventfds standing in
 * for event channels. It never sleeps except in poll() on its eventfd, after
 * RING_FINAL_CHECK_FOR_RESPONSES has re-armed rsp_event, as blkfront does. */
#include "CXenTestSupport.h"
#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

int cxts_kick_fd(void) {
    return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

int cxts_kick(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof(one)) == sizeof(one) ? 0 : -1;
}

int64_t cxts_wait_kicks(int fd, int timeout_ms) {
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    for (;;) {
        int n = poll(&pfd, 1, timeout_ms);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n;
        uint64_t kicks;
        if (read(fd, &kicks, sizeof(kicks)) == sizeof(kicks))
            return (int64_t)kicks;
        if (errno != EAGAIN && errno != EINTR)
            return -1;
    }
}

uint64_t cxts_drain_kicks(int fd) {
    uint64_t kicks;
    return read(fd, &kicks, sizeof(kicks)) == sizeof(kicks) ? kicks : 0;
}

static int16_t expected_status(uint64_t id) {
    return id % 3 == 0 ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY;
}

/* Consumes every published response, checking each; then re-arms rsp_event
 * with RING_FINAL_CHECK_FOR_RESPONSES and goes again if one raced in. */
static int consume_responses(cxts_blk_pump *p, blkif_front_ring_t *r) {
    int more;
    do {
        RING_IDX rp = r->sring->rsp_prod;
        xen_rmb(); /* the responses before rsp_prod */
        if (RING_RESPONSE_PROD_OVERFLOW(r, rp) || rp - r->rsp_cons > r->req_prod_pvt - r->rsp_cons)
            return CXTS_PUMP_OVERFLOW;
        for (; r->rsp_cons != rp; r->rsp_cons++) {
            blkif_response_t rsp;
            RING_COPY_RESPONSE(r, r->rsp_cons, &rsp);
            uint64_t want = p->responses;
            if (rsp.id != want || rsp.operation != want % 2 || rsp.status != expected_status(want))
                return CXTS_PUMP_BAD_RESPONSE;
            p->responses++;
        }
        RING_FINAL_CHECK_FOR_RESPONSES(r, more);
    } while (more);
    return CXTS_PUMP_OK;
}

static void *pump_main(void *arg) {
    cxts_blk_pump *p = arg;
    blkif_front_ring_t r;
    FRONT_RING_ATTACH(&r, (blkif_sring_t *)p->sring, 0, p->bytes);
    uint64_t next = 0;
    while (p->responses < p->count) {
        /* Batches of 1..13 requests, so pushes land at every ring position. */
        unsigned int batch = 1 + (unsigned int)(next % 13), queued = 0;
        for (; queued < batch && next < p->count && !RING_FULL(&r); queued++, next++)
            cxts_blk_front_queue(&r, next, (uint8_t)(next % 2), next, (uint8_t)(next % 12));
        if (queued > 0) {
            int notify;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&r, notify);
            if (notify) {
                if (cxts_kick(p->kick_back) != 0) { p->error = CXTS_PUMP_IO; break; }
                p->kicks_sent++;
            }
        }
        int rc = consume_responses(p, &r);
        if (rc != CXTS_PUMP_OK) { p->error = rc; break; }
        if (p->responses == p->count || (next < p->count && !RING_FULL(&r)))
            continue;
        /* Ring full or all sent, and rsp_event re-armed: only a kick can bring work. */
        int64_t kicks = cxts_wait_kicks(p->kick_front, p->timeout_ms);
        if (kicks <= 0) { p->error = kicks == 0 ? CXTS_PUMP_TIMEOUT : CXTS_PUMP_IO; break; }
        p->kicks_received += (uint64_t)kicks;
    }
    p->error_index = p->responses;
    return NULL;
}

int cxts_blk_pump_start(cxts_blk_pump *p) {
    blkif_front_ring_t r;
    XEN_FRONT_RING_INIT(&r, (blkif_sring_t *)p->sring, p->bytes);
    p->responses = p->kicks_sent = p->kicks_received = 0;
    p->error = CXTS_PUMP_OK;
    p->error_index = 0;
    return pthread_create(&p->thread, NULL, pump_main, p);
}

int cxts_blk_pump_join(cxts_blk_pump *p) {
    return pthread_join(p->thread, NULL);
}
