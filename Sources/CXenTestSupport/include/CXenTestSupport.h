/*
 * Test-only C: sizeof/offsetof probes of the Xen structs, and a blkif front
 * and back end written with ring.h's own macros, acting on the same memory as
 * the Swift rings under test. Nothing here is used outside Tests/.
 */
#ifndef CXEN_TEST_SUPPORT_H
#define CXEN_TEST_SUPPORT_H

#include <CXen.h>
#include <pthread.h>

/* ---- Layout probes (layout.c) ----
 * Names are "tag" for sizeof(struct tag), "union tag" for sizeof(union tag)
 * and "tag.member" for offsetof(struct tag, member), with member spelled as
 * in C ("console.domU.mfn", "seg[1]"). Every value comes from the compiler. */
typedef struct cxts_probe {
    const char *name;
    size_t value;
} cxts_probe;

/* The whole probe table; *count receives its length. */
const cxts_probe *cxts_layout_probes(size_t *count);

/* ---- A blkif front and back end made of ring.h macros (peer.c) ----
 * Single-step functions on a blkif_front_ring_t / blkif_back_ring_t that the
 * caller owns; `sring` is the shared page(s), `bytes` their total size. */

/* Segment i of the request with this id, as both sides of the tests build it:
 * gref = id * 11 + i + 1, first_sect = i % 8, last_sect = 7. */
static inline grant_ref_t cxts_seg_gref(uint64_t id, unsigned int i) {
    return (grant_ref_t)(id * 11 + i + 1);
}

/* SHARED_RING_INIT, then every index moved to `start` (events to start + 1):
 * the header of a ring that has carried `start` requests and responses with
 * notifications enabled. */
void cxts_blk_sring_init_at(void *sring, RING_IDX start);

/* XEN_FRONT_RING_INIT / FRONT_RING_ATTACH. */
void cxts_blk_front_init(blkif_front_ring_t *r, void *sring, size_t bytes);
void cxts_blk_front_attach(blkif_front_ring_t *r, void *sring, size_t bytes, RING_IDX start);
/* RING_FREE_REQUESTS. */
unsigned int cxts_blk_front_free(const blkif_front_ring_t *r);
/* *RING_GET_REQUEST(r, req_prod_pvt++) = {op, nr_segments, handle 0, id, sector,
 * segments per cxts_seg_gref}. Returns 0, queuing nothing, when RING_FULL. */
int cxts_blk_front_queue(blkif_front_ring_t *r, uint64_t id, uint8_t op, uint64_t sector,
                         uint8_t nr_segments);
/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: returns notify. */
int cxts_blk_front_push(blkif_front_ring_t *r);
/* XEN_RING_NR_UNCONSUMED_RESPONSES. */
unsigned int cxts_blk_front_unconsumed(const blkif_front_ring_t *r);
/* RING_COPY_RESPONSE of rsp_cons++: 1 if a response was taken, 0 if none,
 * -1 (taking nothing) on RING_RESPONSE_PROD_OVERFLOW. */
int cxts_blk_front_take(blkif_front_ring_t *r, blkif_response_t *out);
/* RING_FINAL_CHECK_FOR_RESPONSES: returns work_to_do. */
int cxts_blk_front_final_check(blkif_front_ring_t *r);

/* BACK_RING_INIT / BACK_RING_ATTACH. */
void cxts_blk_back_init(blkif_back_ring_t *r, void *sring, size_t bytes);
void cxts_blk_back_attach(blkif_back_ring_t *r, void *sring, size_t bytes, RING_IDX start);
/* XEN_RING_NR_UNCONSUMED_REQUESTS. */
unsigned int cxts_blk_back_unconsumed(const blkif_back_ring_t *r);
/* RING_COPY_REQUEST of req_cons++: 1 if a request was taken, 0 if none,
 * -1 (taking nothing) on RING_REQUEST_PROD_OVERFLOW. */
int cxts_blk_back_take(blkif_back_ring_t *r, blkif_request_t *out);
/* *RING_GET_RESPONSE(r, rsp_prod_pvt++) = {id, op, status}. */
void cxts_blk_back_respond(blkif_back_ring_t *r, uint64_t id, uint8_t op, int16_t status);
/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: returns notify. */
int cxts_blk_back_push(blkif_back_ring_t *r);
/* RING_FINAL_CHECK_FOR_REQUESTS: returns work_to_do. */
int cxts_blk_back_final_check(blkif_back_ring_t *r);

/* ---- Event channel stand-ins: eventfds (pump.c) ---- */
/* A non-blocking eventfd, or -1. */
int cxts_kick_fd(void);
/* notify_remote_via_evtchn: adds 1 to the counter. Returns 0 or -1. */
int cxts_kick(int fd);
/* Waits up to timeout_ms for kicks and consumes them: the number of kicks
 * (> 0), 0 on timeout, -1 on error. */
int64_t cxts_wait_kicks(int fd, int timeout_ms);
/* Consumes pending kicks without waiting: their number, or 0. */
uint64_t cxts_drain_kicks(int fd);

/* ---- A threaded C front end (pump.c) ----
 * A pthread that XEN_FRONT_RING_INITs a blkif ring, then pushes `count`
 * requests (id = sector = 0, 1, 2, ...; op = id % 2) in batches, kicking
 * `kick_back` whenever RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says so, and checks
 * every response (same id and op, status = id % 3 == 0 ? ERROR : OKAY, in
 * order). It sleeps only on `kick_front`, after RING_FINAL_CHECK_FOR_RESPONSES
 * found nothing; a wait longer than timeout_ms is reported as a lost wakeup. */
typedef struct cxts_blk_pump {
    /* In. */
    void *sring;
    size_t bytes;
    uint64_t count;
    int kick_back;
    int kick_front;
    int timeout_ms;
    /* Out, valid after cxts_blk_pump_join. */
    uint64_t responses;       /* responses seen, all checked */
    uint64_t kicks_sent;      /* notifies from RING_PUSH_REQUESTS_AND_CHECK_NOTIFY */
    uint64_t kicks_received;  /* kicks consumed from kick_front */
    int error;                /* 0, or a CXTS_PUMP_* code */
    uint64_t error_index;     /* the response index at which `error` was seen */
    /* Private. */
    pthread_t thread;
} cxts_blk_pump;

enum {
    CXTS_PUMP_OK = 0,
    CXTS_PUMP_BAD_RESPONSE = 1,   /* wrong id, op or status, or out of order */
    CXTS_PUMP_OVERFLOW = 2,       /* RING_RESPONSE_PROD_OVERFLOW */
    CXTS_PUMP_TIMEOUT = 3,        /* waited timeout_ms for a kick: lost wakeup */
    CXTS_PUMP_IO = 4,             /* eventfd error */
};

/* Initialises the ring (before returning) and starts the thread. 0 or an errno. */
int cxts_blk_pump_start(cxts_blk_pump *p);
/* Waits for the thread. 0 or an errno. */
int cxts_blk_pump_join(cxts_blk_pump *p);

#endif /* CXEN_TEST_SUPPORT_H */
