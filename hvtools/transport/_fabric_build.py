"""Build (once) and load the cffi extension that binds libfabric.

libfabric's data path (``fi_read``, ``fi_write``, ``fi_cq_read``, ``fi_mr_reg``, ...) is made of
``static inline`` functions in ``rdma/fi_*.h`` that jump through the provider's ops tables, so
cffi's ABI mode cannot call them. This module compiles a small out-of-line C layer (API mode)
that owns one RDM endpoint (fabric, domain, AV, CQ, EP) and exposes flat calls. The built
module is cached under ``$HVTOOLS_HOME/cache/transport/`` keyed by a hash of the C source and
cdef, so a change of either rebuilds it; concurrent builders are serialised by a file lock and
the result is renamed into place atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hvtools import cext

CDEF = r"""
typedef struct hvt_ep hvt_ep;
struct hvt_err { char msg[256]; };

int hvt_open(const char *prov, const char *node, const char *service, size_t tx_size,
             size_t cq_size, int use_wait, hvt_ep **out, struct hvt_err *err);
void hvt_close(hvt_ep *h);
const char *hvt_prov_name(hvt_ep *h);
uint64_t hvt_mr_mode(hvt_ep *h);
uint32_t hvt_addr_format(hvt_ep *h);
size_t hvt_tx_size(hvt_ep *h);
size_t hvt_max_msg_size(hvt_ep *h);
size_t hvt_mr_key_size(hvt_ep *h);
int hvt_has_wait(hvt_ep *h);
int hvt_getname(hvt_ep *h, void *buf, size_t *len);
int hvt_av_insert(hvt_ep *h, const void *addr, uint64_t *fi_addr);
int hvt_av_remove(hvt_ep *h, uint64_t fi_addr);

int hvt_mr_reg(hvt_ep *h, void *buf, size_t len, uint64_t access, uint64_t requested_key,
               void **mr, uint64_t *key, void **desc);
int hvt_mr_close(void *mr);

ssize_t hvt_post(hvt_ep *h, int write, void *buf, size_t len, void *desc, uint64_t peer,
                 uint64_t addr, uint64_t key, uint64_t ctx);
ssize_t hvt_post_many(hvt_ep *h, int write, size_t n, void **bufs, size_t *lens, void **descs,
                      uint64_t peer, uint64_t *addrs, uint64_t *keys, uint64_t *ctxs,
                      ssize_t *last_err);
ssize_t hvt_cq_read(hvt_ep *h, uint64_t *ctxs, size_t count, int timeout_ms);
ssize_t hvt_cq_readerr(hvt_ep *h, uint64_t *ctx, int *err, struct hvt_err *msg);
int hvt_cq_signal(hvt_ep *h);
const char *hvt_strerror(int err);

#define FI_READ ...
#define FI_WRITE ...
#define FI_REMOTE_READ ...
#define FI_REMOTE_WRITE ...
#define FI_MR_LOCAL ...
#define FI_MR_VIRT_ADDR ...
#define FI_MR_ALLOCATED ...
#define FI_MR_PROV_KEY ...
#define FI_MR_ENDPOINT ...
#define FI_MR_RAW ...
#define FI_EAGAIN ...
#define FI_EAVAIL ...
#define FI_ETIMEDOUT ...
#define FI_SOCKADDR_IN ...
#define FI_SOCKADDR_IN6 ...
#define FI_ADDR_STR ...
"""

SOURCE = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#define HVT_API FI_VERSION(1, 17)
/* The mr_mode bits we can honour (fi_mr(3) "MR Modes"); the provider clears the ones it does
 * not need and we obey what is left in info->domain_attr->mr_mode. */
#define HVT_MR_MODES (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | \
                      FI_MR_ENDPOINT)

struct hvt_err { char msg[256]; };

typedef struct hvt_ep {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    int has_wait;
} hvt_ep;

static int fail(struct hvt_err *e, const char *what, int rc)
{
    snprintf(e->msg, sizeof e->msg, "%s: %s (%d)", what, fi_strerror(-rc), rc);
    return rc;
}

void hvt_close(hvt_ep *h)
{
    if (!h) return;
    if (h->ep) fi_close(&h->ep->fid);
    if (h->cq) fi_close(&h->cq->fid);
    if (h->av) fi_close(&h->av->fid);
    if (h->domain) fi_close(&h->domain->fid);
    if (h->fabric) fi_close(&h->fabric->fid);
    if (h->info) fi_freeinfo(h->info);
    free(h);
}

int hvt_open(const char *prov, const char *node, const char *service, size_t tx_size,
             size_t cq_size, int use_wait, hvt_ep **out, struct hvt_err *err)
{
    struct fi_info *hints = fi_allocinfo();
    hvt_ep *h = calloc(1, sizeof *h);
    struct fi_av_attr av_attr = { .type = FI_AV_UNSPEC };
    struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT, .wait_obj = FI_WAIT_UNSPEC };
    int rc;

    *out = NULL;
    if (!hints || !h) { free(h); fi_freeinfo(hints); return fail(err, "allocation", -FI_ENOMEM); }
    hints->caps = FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode = HVT_MR_MODES;
    hints->domain_attr->threading = FI_THREAD_SAFE;
    hints->fabric_attr->prov_name = strdup(prov);
    if (tx_size) hints->tx_attr->size = tx_size;
    rc = fi_getinfo(HVT_API, node, service, (node || service) ? FI_SOURCE : 0, hints, &h->info);
    fi_freeinfo(hints);
    if (rc) { hvt_close(h); return fail(err, "fi_getinfo", rc); }

    if ((rc = fi_fabric(h->info->fabric_attr, &h->fabric, NULL)))
        { hvt_close(h); return fail(err, "fi_fabric", rc); }
    if ((rc = fi_domain(h->fabric, h->info, &h->domain, NULL)))
        { hvt_close(h); return fail(err, "fi_domain", rc); }
    if ((rc = fi_av_open(h->domain, &av_attr, &h->av, NULL)))
        { hvt_close(h); return fail(err, "fi_av_open", rc); }
    cq_attr.size = cq_size;
    rc = use_wait ? fi_cq_open(h->domain, &cq_attr, &h->cq, NULL) : -FI_ENOSYS;
    h->has_wait = rc == 0;
    if (rc) {  /* no wait object: poll with fi_cq_read */
        cq_attr.wait_obj = FI_WAIT_NONE;
        if ((rc = fi_cq_open(h->domain, &cq_attr, &h->cq, NULL)))
            { hvt_close(h); return fail(err, "fi_cq_open", rc); }
    }
    if ((rc = fi_endpoint(h->domain, h->info, &h->ep, NULL)))
        { hvt_close(h); return fail(err, "fi_endpoint", rc); }
    if ((rc = fi_ep_bind(h->ep, &h->av->fid, 0)))
        { hvt_close(h); return fail(err, "fi_ep_bind(av)", rc); }
    if ((rc = fi_ep_bind(h->ep, &h->cq->fid, FI_TRANSMIT | FI_RECV)))
        { hvt_close(h); return fail(err, "fi_ep_bind(cq)", rc); }
    if ((rc = fi_enable(h->ep)))
        { hvt_close(h); return fail(err, "fi_enable", rc); }
    *out = h;
    return 0;
}

const char *hvt_prov_name(hvt_ep *h) { return h->info->fabric_attr->prov_name; }
uint64_t hvt_mr_mode(hvt_ep *h) { return (uint64_t)h->info->domain_attr->mr_mode; }
uint32_t hvt_addr_format(hvt_ep *h) { return h->info->addr_format; }
size_t hvt_tx_size(hvt_ep *h) { return h->info->tx_attr->size; }
size_t hvt_max_msg_size(hvt_ep *h) { return h->info->ep_attr->max_msg_size; }
size_t hvt_mr_key_size(hvt_ep *h) { return h->info->domain_attr->mr_key_size; }
int hvt_has_wait(hvt_ep *h) { return h->has_wait; }

int hvt_getname(hvt_ep *h, void *buf, size_t *len) { return fi_getname(&h->ep->fid, buf, len); }

int hvt_av_insert(hvt_ep *h, const void *addr, uint64_t *fi_addr)
{
    fi_addr_t a = FI_ADDR_NOTAVAIL;
    int rc = fi_av_insert(h->av, addr, 1, &a, 0, NULL);
    *fi_addr = a;
    return rc == 1 ? 0 : (rc < 0 ? rc : -FI_EINVAL);
}

int hvt_av_remove(hvt_ep *h, uint64_t fi_addr)
{
    fi_addr_t a = fi_addr;
    return fi_av_remove(h->av, &a, 1, 0);
}

int hvt_mr_reg(hvt_ep *h, void *buf, size_t len, uint64_t access, uint64_t requested_key,
               void **mr, uint64_t *key, void **desc)
{
    struct fid_mr *m = NULL;
    int rc = fi_mr_reg(h->domain, buf, len, access, 0, requested_key, 0, &m, NULL);
    if (rc) return rc;
    if (h->info->domain_attr->mr_mode & FI_MR_ENDPOINT) {  /* fi_mr(3): bind, then enable */
        if ((rc = fi_mr_bind(m, &h->ep->fid, 0)) || (rc = fi_mr_enable(m))) {
            fi_close(&m->fid);
            return rc;
        }
    }
    *mr = m;
    *key = fi_mr_key(m);
    *desc = fi_mr_desc(m);
    return 0;
}

int hvt_mr_close(void *mr) { return fi_close(&((struct fid_mr *)mr)->fid); }

ssize_t hvt_post(hvt_ep *h, int write, void *buf, size_t len, void *desc, uint64_t peer,
                 uint64_t addr, uint64_t key, uint64_t ctx)
{
    struct iovec iov = { buf, len };
    struct fi_rma_iov rma = { addr, len, key };
    struct fi_msg_rma msg = { &iov, &desc, 1, peer, &rma, 1, (void *)(uintptr_t)ctx, 0 };
    if (write)  /* complete only once the target has placed (and so accepted) the data:
                 * fi_cq(3) FI_DELIVERY_COMPLETE; the default would complete on send. */
        return fi_writemsg(h->ep, &msg, FI_COMPLETION | FI_DELIVERY_COMPLETE);
    return fi_read(h->ep, buf, len, desc, peer, addr, key, (void *)(uintptr_t)ctx);
}

/* Post ops in order until one fails; returns how many were posted. *last_err is the error of
 * the first op not posted (-FI_EAGAIN when the queue is full) or 0. */
ssize_t hvt_post_many(hvt_ep *h, int write, size_t n, void **bufs, size_t *lens, void **descs,
                      uint64_t peer, uint64_t *addrs, uint64_t *keys, uint64_t *ctxs,
                      ssize_t *last_err)
{
    size_t i;
    *last_err = 0;
    for (i = 0; i < n; i++) {
        ssize_t rc = hvt_post(h, write, bufs[i], lens[i], descs[i], peer, addrs[i], keys[i],
                              ctxs[i]);
        if (rc) { *last_err = rc; break; }
    }
    return (ssize_t)i;
}

/* Read up to count completions; wait up to timeout_ms (0: do not wait) for the first one. */
ssize_t hvt_cq_read(hvt_ep *h, uint64_t *ctxs, size_t count, int timeout_ms)
{
    struct fi_cq_entry ent[64];
    ssize_t rc;
    size_t i;
    if (count > 64) count = 64;
    if (timeout_ms > 0 && h->has_wait) {
        rc = fi_cq_sread(h->cq, ent, count, NULL, timeout_ms);
    } else {
        /* Spin a little, then nap with a growing interval (up to 200 us) until timeout. */
        struct timespec t0, now, nap = { 0, 0 };
        int spins = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            rc = fi_cq_read(h->cq, ent, count);
            if (rc != -FI_EAGAIN || timeout_ms <= 0) break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000
                >= timeout_ms) break;
            if (++spins > 64) {
                nap.tv_nsec = nap.tv_nsec < 200000 ? nap.tv_nsec + 10000 : 200000;
                nanosleep(&nap, NULL);
            }
        }
    }
    if (rc == -FI_ETIMEDOUT) rc = -FI_EAGAIN;
    for (i = 0; rc > 0 && i < (size_t)rc; i++)
        ctxs[i] = (uint64_t)(uintptr_t)ent[i].op_context;
    return rc;
}

ssize_t hvt_cq_readerr(hvt_ep *h, uint64_t *ctx, int *err, struct hvt_err *msg)
{
    struct fi_cq_err_entry e;
    char buf[200];
    ssize_t rc;
    memset(&e, 0, sizeof e);
    rc = fi_cq_readerr(h->cq, &e, 0);
    if (rc < 0) return rc;
    *ctx = (uint64_t)(uintptr_t)e.op_context;
    *err = e.err;
    snprintf(msg->msg, sizeof msg->msg, "%s (%s)", fi_strerror(e.err),
             fi_cq_strerror(h->cq, e.prov_errno, e.err_data, buf, sizeof buf));
    return rc;
}

int hvt_cq_signal(hvt_ep *h) { return h->has_wait ? fi_cq_signal(h->cq) : 0; }
const char *hvt_strerror(int err) { return fi_strerror(err); }
"""


def _missing_dependency() -> str | None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "gcc is missing (apt-get install gcc libc6-dev)"
    if not Path("/usr/include/rdma/fi_rma.h").exists():
        return ("libfabric headers are missing: /usr/include/rdma/fi_rma.h "
                "(apt-get install libfabric-dev)")
    return None


def load() -> Any:
    """The compiled module (``.ffi``, ``.lib``), built on first use and cached."""
    # shm's CMA fast path (libfabric 1.17 smr_rma_fast) copies straight out of the target
    # process with process_vm_readv/writev, skipping the target's key and range check
    # (ofi_mr_map_verify): a wrong key or a range past the region would be served. Without
    # CMA every op is a command the target verifies. Must be set before fi_getinfo runs.
    os.environ["FI_SHM_DISABLE_CMA"] = "1"
    return cext.load("transport", CDEF, SOURCE, libraries=["fabric"],
                     what="the libfabric binding (needs libfabric-dev and gcc)",
                     missing=_missing_dependency)
