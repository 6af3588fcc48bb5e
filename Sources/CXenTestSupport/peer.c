/* A blkif front and back end written only with ring.h's macros, one step per
 * function, so Swift tests can interleave them with the Swift rings on the
 * same shared memory. The consumer side reads the producer index once and
 * puts a read barrier before the entries, as Linux blkfront/blkback do. */
#include "CXenTestSupport.h"

void cxts_blk_sring_init_at(void *sring, RING_IDX start) {
    blkif_sring_t *s = sring;
    SHARED_RING_INIT(s);
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
}

/* ---- Front end ---- */

void cxts_blk_front_init(blkif_front_ring_t *r, void *sring, size_t bytes) {
    XEN_FRONT_RING_INIT(r, (blkif_sring_t *)sring, bytes);
}

void cxts_blk_front_attach(blkif_front_ring_t *r, void *sring, size_t bytes, RING_IDX start) {
    FRONT_RING_ATTACH(r, (blkif_sring_t *)sring, start, bytes);
}

unsigned int cxts_blk_front_free(const blkif_front_ring_t *r) {
    return RING_FREE_REQUESTS(r);
}

int cxts_blk_front_queue(blkif_front_ring_t *r, uint64_t id, uint8_t op, uint64_t sector,
                         uint8_t nr_segments) {
    if (RING_FULL(r))
        return 0;
    blkif_request_t *req = RING_GET_REQUEST(r, r->req_prod_pvt);
    req->operation = op;
    req->nr_segments = nr_segments;
    req->handle = 0;
    req->id = id;
    req->sector_number = sector;
    for (unsigned int i = 0; i < nr_segments && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
        req->seg[i].gref = cxts_seg_gref(id, i);
        req->seg[i].first_sect = i % 8;
        req->seg[i].last_sect = 7;
    }
    r->req_prod_pvt++;
    return 1;
}

int cxts_blk_front_push(blkif_front_ring_t *r) {
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(r, notify);
    return notify;
}

unsigned int cxts_blk_front_unconsumed(const blkif_front_ring_t *r) {
    return XEN_RING_NR_UNCONSUMED_RESPONSES(r);
}

int cxts_blk_front_take(blkif_front_ring_t *r, blkif_response_t *out) {
    RING_IDX rp = r->sring->rsp_prod;
    xen_rmb(); /* the responses before rsp_prod */
    if (RING_RESPONSE_PROD_OVERFLOW(r, rp))
        return -1;
    if (r->rsp_cons == rp)
        return 0;
    RING_COPY_RESPONSE(r, r->rsp_cons, out);
    r->rsp_cons++;
    return 1;
}

int cxts_blk_front_final_check(blkif_front_ring_t *r) {
    int work;
    RING_FINAL_CHECK_FOR_RESPONSES(r, work);
    return work;
}

/* ---- Back end ---- */

void cxts_blk_back_init(blkif_back_ring_t *r, void *sring, size_t bytes) {
    BACK_RING_INIT(r, (blkif_sring_t *)sring, bytes);
}

void cxts_blk_back_attach(blkif_back_ring_t *r, void *sring, size_t bytes, RING_IDX start) {
    BACK_RING_ATTACH(r, (blkif_sring_t *)sring, start, bytes);
}

unsigned int cxts_blk_back_unconsumed(const blkif_back_ring_t *r) {
    return XEN_RING_NR_UNCONSUMED_REQUESTS(r);
}

int cxts_blk_back_take(blkif_back_ring_t *r, blkif_request_t *out) {
    RING_IDX rp = r->sring->req_prod;
    xen_rmb(); /* the requests before req_prod */
    if (RING_REQUEST_PROD_OVERFLOW(r, rp))
        return -1;
    if (!RING_HAS_UNCONSUMED_REQUESTS(r))
        return 0;
    RING_COPY_REQUEST(r, r->req_cons, out);
    r->req_cons++;
    return 1;
}

void cxts_blk_back_respond(blkif_back_ring_t *r, uint64_t id, uint8_t op, int16_t status) {
    blkif_response_t *rsp = RING_GET_RESPONSE(r, r->rsp_prod_pvt);
    rsp->id = id;
    rsp->operation = op;
    rsp->status = status;
    r->rsp_prod_pvt++;
}

int cxts_blk_back_push(blkif_back_ring_t *r) {
    int notify;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(r, notify);
    return notify;
}

int cxts_blk_back_final_check(blkif_back_ring_t *r) {
    int work;
    RING_FINAL_CHECK_FOR_REQUESTS(r, work);
    return work;
}
