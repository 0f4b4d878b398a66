/* hvtdma: drive the hvt-pci DMA engine (PCI 1234:11f0, qemu-patches/README.md) from a guest.
 *
 *   hvtdma list
 *       BDFs of the hvt-pci devices, one a line.
 *   hvtdma pasid [--len BYTES] [--fault] [--hold SECONDS]
 *       Through the hvtpasid kernel module (pasid image variant): the device's PASID-tagged
 *       requests are translated by the domain the module attached to its PASID. Maps two user
 *       buffers there (HVTP_MAP), moves a pattern buffer -> SRAM (MEM2DEV) -> buffer (DEV2MEM)
 *       and buffer -> buffer (MEM2MEM) with PASID.VALID and that PASID, and checks the bytes;
 *       then the controls: the same DEV2MEM without PASID (the requester ID's DMA-API domain
 *       does not map the IOVA: WRITE_FAULT) and, with --fault, after HVTP_UNMAP (a fault of
 *       a request-with-PASID: the guest kernel logs it with the PASID). --hold keeps the
 *       source buffer mapped that long after "holding ..." (the host can walk the tables).
 *       On a confidential device instead: a window tagged with the PASID admits requests
 *       with that tag only (untagged or another PASID: BLOCKED), inside the window only.
 *   hvtdma vfio-check [BDF]
 *       Through vfio-pci (any image), on a device fresh from reset: its secure interface as its
 *       CAPS security level says. A confidential device cannot write outside its registered
 *       bounce window (BLOCKED, the counter, memory unchanged), nor before it has one; it can
 *       write into it and read from it; the window is locked once enabled. A trusted device
 *       writes anywhere the IOMMU maps, window or not.
 *   hvtdma vfio-bench [BDF] --mode direct|bounce [--total MIB] [--chunk BYTES] [--runs N]
 *       Device -> guest throughput through vfio-pci: direct (DEV2MEM straight into the
 *       destination buffer, a trusted VM's way) or bounce (DEV2MEM into the registered window,
 *       then memcpy out, a confidential VM's way), each chunk's bytes checked after the timed
 *       loop. One line per run: "run I mibps=X seconds=T copy_seconds=C" (C: the memcpy's
 *       share of T, 0 for direct).
 *   hvtdma edu kmod | hvtdma edu vfio BDF
 *       The same plumbing (user buffers mapped for a device, BAR0 mapped, a DMA each way)
 *       against stock QEMU's edu device, so it is testable without the patched QEMU.
 *
 * BDF defaults to the only hvt-pci device there is.
 * Every check prints "check NAME ok|FAIL ..."; the exit status is 1 if any failed, 2 on
 * usage errors, 3 when the set-up (module, vfio, mapping) failed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/vfio.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "hvtpasid.h"

/* BAR0 registers (qemu-patches/README.md, "hvt-pci") */
#define R_ID 0x00
#define R_CAPS 0x04
#define R_SRC 0x08
#define R_DST 0x10
#define R_LEN 0x18
#define R_PASID 0x1C
#define R_CTRL 0x20
#define R_DOORBELL 0x24
#define R_STATUS 0x28
#define R_XFERRED 0x2C
#define R_FAULT_ADDR 0x30
#define R_BLOCKED 0x38
#define R_COMPLETED 0x3C
#define R_WIN_BASE 0x40
#define R_WIN_SIZE 0x48
#define R_WIN_CTRL 0x4C
#define R_WIN_PASID 0x50

#define HVT_ID 0x68767401u
#define CAPS_LEVEL(c) (((c) >> 16) & 3u)
#define PASID_VALID (1u << 31)
#define DIR_MEM2MEM 0u
#define DIR_MEM2DEV 1u
#define DIR_DEV2MEM 2u
#define ST_DONE 1u
#define ST_BUSY 2u
#define ST_ERROR 4u
#define ST_OVERRUN 8u
#define ST_CODE(s) (((s) >> 8) & 0xffu)
#define CODE_READ_FAULT 6u
#define CODE_WRITE_FAULT 7u
#define CODE_BLOCKED 8u
#define SRAM_SIZE (1u << 20)

/* edu (QEMU docs/specs/edu.rst) */
#define EDU_ID_MASK 0xffffu
#define EDU_ID 0x00edu
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000u

#define PAGE 4096u

static int failures;

static void die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hvtdma: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(status);
}

static void check(const char *name, int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("check %s %s ", name, ok ? "ok" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
    if (!ok)
        failures++;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *alloc_pages(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (p == MAP_FAILED)
        die(3, "mmap %zu bytes: %s", size, strerror(errno));
    return p;
}

static void fill(void *buf, size_t len, uint32_t seed)
{
    uint32_t *w = buf, x = seed | 1u;
    for (size_t i = 0; i < len / 4; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        w[i] = x;
    }
}

static int all_bytes(const void *buf, size_t len, uint8_t v)
{
    const uint8_t *b = buf;
    for (size_t i = 0; i < len; i++)
        if (b[i] != v)
            return 0;
    return 1;
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        die(3, "write %s to %s: %s", text, path, strerror(errno));
    close(fd);
}

/* -- the device's registers ----------------------------------------------------------------- */

struct dev {
    const char *bdf;
    volatile uint8_t *bar0;
    volatile uint8_t *bar2; /* SRAM; NULL when not mapped */
};

static uint32_t rd32(const struct dev *d, unsigned off)
{
    return *(volatile uint32_t *)(d->bar0 + off);
}

static void wr32(const struct dev *d, unsigned off, uint32_t v)
{
    *(volatile uint32_t *)(d->bar0 + off) = v;
}

static uint64_t rd64(const struct dev *d, unsigned off)
{
    return rd32(d, off) | (uint64_t)rd32(d, off + 4) << 32;
}

static void wr64(const struct dev *d, unsigned off, uint64_t v)
{
    wr32(d, off, (uint32_t)v); /* low half first */
    wr32(d, off + 4, (uint32_t)(v >> 32));
}

struct dma_res {
    uint32_t status, code, xferred;
    uint64_t fault_addr;
    int timed_out;
};

/* One DMA, polled to completion (the engine runs in a QEMU bottom half). */
static struct dma_res dma(const struct dev *d, uint64_t src, uint64_t dst, uint32_t len,
                          uint32_t pasid_reg, uint32_t dir)
{
    struct dma_res r = {0};
    wr32(d, R_STATUS, ST_DONE | ST_ERROR | ST_OVERRUN);
    wr64(d, R_SRC, src);
    wr64(d, R_DST, dst);
    wr32(d, R_LEN, len);
    wr32(d, R_PASID, pasid_reg);
    wr32(d, R_CTRL, dir);
    wr32(d, R_DOORBELL, 1);
    double deadline = now() + 30;
    for (;;) {
        uint32_t s = rd32(d, R_STATUS);
        if (!(s & ST_BUSY) && (s & (ST_DONE | ST_ERROR))) {
            r.status = s;
            break;
        }
        if (now() > deadline) {
            r.status = s;
            r.timed_out = 1;
            break;
        }
    }
    r.code = ST_CODE(r.status);
    r.xferred = rd32(d, R_XFERRED);
    r.fault_addr = rd64(d, R_FAULT_ADDR);
    return r;
}

static int dma_ok(const struct dma_res *r)
{
    return !r->timed_out && (r->status & ST_DONE) && !(r->status & ST_ERROR);
}

static void *map_resource(const char *bdf, int bar, size_t size)
{
    char path[320];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource%d", bdf, bar);
    int fd = open(path, O_RDWR | O_SYNC);
    if (fd < 0)
        die(3, "open %s: %s", path, strerror(errno));
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die(3, "mmap %s: %s", path, strerror(errno));
    close(fd);
    return p;
}

static int is_hvt(const char *bdf, unsigned vendor, unsigned device)
{
    char path[320];
    unsigned v = 0, dv = 0;
    FILE *f;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", bdf);
    if (!(f = fopen(path, "r")))
        return 0;
    if (fscanf(f, "%x", &v) != 1)
        v = 0;
    fclose(f);
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", bdf);
    if (!(f = fopen(path, "r")))
        return 0;
    if (fscanf(f, "%x", &dv) != 1)
        dv = 0;
    fclose(f);
    return v == vendor && dv == device;
}

static int cmd_list(void)
{
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    if (!dir)
        die(3, "/sys/bus/pci/devices: %s", strerror(errno));
    while ((e = readdir(dir)))
        if (e->d_name[0] != '.' && is_hvt(e->d_name, 0x1234, 0x11f0))
            printf("%s\n", e->d_name);
    closedir(dir);
    return 0;
}

/* -- PASID through the hvtpasid module ------------------------------------------------------ */

struct kmod {
    int fd;
    struct hvtp_info info;
};

static struct kmod kmod_open(void)
{
    struct kmod k;
    k.fd = open("/dev/hvtpasid", O_RDWR);
    if (k.fd < 0)
        die(3, "/dev/hvtpasid: %s (is hvtpasid loaded and bound?)", strerror(errno));
    if (ioctl(k.fd, HVTP_GET_INFO, &k.info))
        die(3, "HVTP_GET_INFO: %s", strerror(errno));
    return k;
}

static int kmod_map(const struct kmod *k, void *buf, uint64_t iova, size_t size, uint32_t prot)
{
    struct hvtp_map m = {.uaddr = (uintptr_t)buf, .iova = iova, .size = size, .prot = prot};
    return ioctl(k->fd, HVTP_MAP, &m) ? -errno : 0;
}

static int kmod_unmap(const struct kmod *k, uint64_t iova)
{
    struct hvtp_unmap u = {.iova = iova};
    return ioctl(k->fd, HVTP_UNMAP, &u) ? -errno : 0;
}

/* A confidential device whose window carries the PASID tag: only requests with that tag, into
 * the window, pass the secure interface (and then the IOMMU's PASID domain). */
static int pasid_confidential(const struct dev *d, const struct kmod *k, uint8_t *src,
                              uint8_t *dst, uint32_t len, uint64_t iova_src, uint64_t iova_dst)
{
    uint32_t tag = PASID_VALID | k->info.pasid;
    uint32_t other = PASID_VALID | (k->info.pasid ^ 1); /* within the width, not ours */
    struct dma_res r;
    uint32_t blocked0 = rd32(d, R_BLOCKED);
    if (rd32(d, R_WIN_CTRL) & 1)
        die(3, "%s already has a window: needs a device fresh from reset", d->bdf);
    uint8_t *sram = map_resource(d->bdf, 2, SRAM_SIZE);
    fill(sram, len, 0xFACEu);
    wr64(d, R_WIN_BASE, iova_dst);
    wr32(d, R_WIN_SIZE, len);
    wr32(d, R_WIN_PASID, tag);
    wr32(d, R_WIN_CTRL, 1);

    r = dma(d, 0, iova_dst, len, tag, DIR_DEV2MEM);
    check("confidential-pasid-window-writes", dma_ok(&r) && !memcmp(dst, sram, len),
          "status=%#x code=%u", r.status, r.code);
    memset(dst, 0, len);
    r = dma(d, 0, iova_dst, len, 0, DIR_DEV2MEM);
    check("confidential-untagged-blocked",
          (r.status & ST_ERROR) && r.code == CODE_BLOCKED && all_bytes(dst, len, 0),
          "status=%#x code=%u", r.status, r.code);
    r = dma(d, 0, iova_dst, len, other, DIR_DEV2MEM);
    check("confidential-other-pasid-blocked",
          (r.status & ST_ERROR) && r.code == CODE_BLOCKED && all_bytes(dst, len, 0),
          "status=%#x code=%u", r.status, r.code);
    r = dma(d, iova_src, 0, len, tag, DIR_MEM2DEV);
    check("confidential-tagged-outside-blocked",
          (r.status & ST_ERROR) && r.code == CODE_BLOCKED && r.fault_addr == iova_src,
          "status=%#x code=%u fault_addr=%#llx", r.status, r.code,
          (unsigned long long)r.fault_addr);
    memcpy(dst, src, len); /* the guest copies in, the device reads the window */
    r = dma(d, iova_dst, 0, len, tag, DIR_MEM2DEV);
    check("confidential-pasid-window-reads", dma_ok(&r) && !memcmp(sram, src, len),
          "status=%#x code=%u", r.status, r.code);
    uint32_t blocked = rd32(d, R_BLOCKED) - blocked0;
    check("confidential-blocked-count", blocked == 3, "BLOCKED advanced by %u", blocked);
    return failures ? 1 : 0;
}

static int cmd_pasid(int argc, char **argv)
{
    uint32_t len = 64 * 1024;
    int want_fault = 0, hold = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--len") && i + 1 < argc)
            len = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--hold") && i + 1 < argc)
            hold = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--fault"))
            want_fault = 1;
        else
            die(2, "pasid: unknown argument %s", argv[i]);
    }
    if (!len || len % PAGE || len > SRAM_SIZE)
        die(2, "--len must be a multiple of 4096 up to 1 MiB");

    struct kmod k = kmod_open();
    printf("device=%s pasid=%u flags=%#x pasid_ctrl=%#x max_pasids=%u\n", k.info.bdf,
           k.info.pasid, k.info.flags, k.info.pasid_ctrl, k.info.max_pasids);
    if (!(k.info.flags & HVTP_F_PASID))
        die(3, "hvtpasid attached its domain to the requester ID, not a PASID");
    struct dev d = {.bdf = k.info.bdf, .bar0 = map_resource(k.info.bdf, 0, PAGE)};
    uint32_t id = rd32(&d, R_ID), caps = rd32(&d, R_CAPS);
    printf("id=%#x caps=%#x\n", id, caps);
    if (id != HVT_ID)
        die(3, "%s: ID register %#x, not hvt-pci's %#x", d.bdf, id, HVT_ID);
    check("pasid-enabled", k.info.pasid_ctrl & 1, "PASID Control %#x", k.info.pasid_ctrl);

    /* IOVAs far from anything the DMA API hands out for this device (it hands out none). */
    const uint64_t iova_src = 0x40000000ull, iova_dst = 0x80000000ull;
    uint8_t *src = alloc_pages(len), *dst = alloc_pages(len);
    fill(src, len, 0xC0FFEEu);
    memset(dst, 0, len);
    int e;
    if ((e = kmod_map(&k, src, iova_src, len, HVTP_READ)))
        die(3, "HVTP_MAP src: %s", strerror(-e));
    if ((e = kmod_map(&k, dst, iova_dst, len, HVTP_READ | HVTP_WRITE)))
        die(3, "HVTP_MAP dst: %s", strerror(-e));
    uint32_t tag = PASID_VALID | k.info.pasid;
    if (CAPS_LEVEL(caps) == 1)
        return pasid_confidential(&d, &k, src, dst, len, iova_src, iova_dst);
    uint32_t completed0 = rd32(&d, R_COMPLETED);

    struct dma_res r = dma(&d, iova_src, 0, len, tag, DIR_MEM2DEV);
    check("mem2dev-pasid", dma_ok(&r), "status=%#x code=%u xferred=%u", r.status, r.code,
          r.xferred);
    r = dma(&d, 0, iova_dst, len, tag, DIR_DEV2MEM);
    int same = !memcmp(src, dst, len);
    check("dev2mem-pasid", dma_ok(&r) && same, "status=%#x code=%u xferred=%u bytes_match=%d",
          r.status, r.code, r.xferred, same);

    memset(dst, 0, len);
    r = dma(&d, iova_src, iova_dst, len, tag, DIR_MEM2MEM);
    same = !memcmp(src, dst, len);
    check("mem2mem-pasid", dma_ok(&r) && same, "status=%#x code=%u bytes_match=%d", r.status,
          r.code, same);
    uint32_t completed = rd32(&d, R_COMPLETED) - completed0;
    check("completed-count", completed == 3, "COMPLETED advanced by %u", completed);

    /* Control: the same IOVA without a PASID goes through the requester ID's domain, which
     * the module never touched: nothing there at 0x80000000, so the write faults. */
    memset(dst, 0, len);
    r = dma(&d, 0, iova_dst, len, 0, DIR_DEV2MEM);
    check("dev2mem-no-pasid-faults",
          !r.timed_out && (r.status & ST_ERROR) && r.code == CODE_WRITE_FAULT &&
              r.fault_addr == iova_dst && all_bytes(dst, len, 0),
          "status=%#x code=%u fault_addr=%#llx untouched=%d", r.status, r.code,
          (unsigned long long)r.fault_addr, all_bytes(dst, len, 0));

    if (want_fault) {
        /* Let the guest's fault handler clear the first record: a VT-d unit may collapse a
         * new fault of a requester whose earlier one is still pending (QEMU does). */
        usleep(500000);
        if ((e = kmod_unmap(&k, iova_dst)))
            die(3, "HVTP_UNMAP: %s", strerror(-e));
        r = dma(&d, 0, iova_dst, len, tag, DIR_DEV2MEM);
        check("dev2mem-pasid-after-unmap-faults",
              !r.timed_out && (r.status & ST_ERROR) && r.code == CODE_WRITE_FAULT &&
                  r.fault_addr == iova_dst && r.xferred == 0 && all_bytes(dst, len, 0),
              "status=%#x code=%u fault_addr=%#llx xferred=%u", r.status, r.code,
              (unsigned long long)r.fault_addr, r.xferred);
    }
    printf("pasid=%u iova_src=%#llx iova_dst=%#llx len=%u\n", k.info.pasid,
           (unsigned long long)iova_src, (unsigned long long)iova_dst, len);
    if (hold > 0) {
        printf("holding %ds: iova %#llx maps the source, whose first 16 bytes are ", hold,
               (unsigned long long)iova_src);
        for (int i = 0; i < 16; i++)
            printf("%02x", src[i]);
        printf("\n");
        fflush(stdout);
        sleep((unsigned)hold);
    }
    return failures ? 1 : 0;
}

/* -- vfio ----------------------------------------------------------------------------------- */

struct vfio {
    int container;
    int iommu_set;
};

struct vdev {
    struct dev d;
    int group, fd;
    uint32_t caps;
};

static void vfio_bind(const char *bdf)
{
    char path[256], link[256];
    ssize_t n;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", bdf);
    n = readlink(path, link, sizeof link - 1);
    if (n > 0) {
        link[n] = 0;
        if (!strcmp(basename(link), "vfio-pci"))
            return;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver/unbind", bdf);
        write_file(path, bdf);
    }
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver_override", bdf);
    write_file(path, "vfio-pci");
    write_file("/sys/bus/pci/drivers_probe", bdf);
}

static struct vfio vfio_open(void)
{
    if (access("/sys/bus/pci/drivers/vfio-pci", F_OK) &&
        system("modprobe -a vfio_iommu_type1 vfio_pci") != 0)
        die(3, "modprobe vfio_pci failed");
    struct vfio v = {.container = open("/dev/vfio/vfio", O_RDWR), .iommu_set = 0};
    if (v.container < 0)
        die(3, "/dev/vfio/vfio: %s", strerror(errno));
    if (ioctl(v.container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        die(3, "unknown VFIO API version");
    if (!ioctl(v.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU))
        die(3, "no VFIO type1v2 IOMMU (is the guest's IOMMU on?)");
    return v;
}

static void *vfio_region(int fd, unsigned index, uint64_t *size)
{
    struct vfio_region_info ri = {.argsz = sizeof ri, .index = index};
    if (ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
        die(3, "VFIO_DEVICE_GET_REGION_INFO %u: %s", index, strerror(errno));
    if (!(ri.flags & VFIO_REGION_INFO_FLAG_MMAP))
        die(3, "region %u cannot be mmapped", index);
    void *p = mmap(NULL, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)ri.offset);
    if (p == MAP_FAILED)
        die(3, "mmap region %u: %s", index, strerror(errno));
    *size = ri.size;
    return p;
}

static void vfio_enable_bus_master(int fd)
{
    struct vfio_region_info ri = {.argsz = sizeof ri, .index = VFIO_PCI_CONFIG_REGION_INDEX};
    uint16_t cmd;
    if (ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
        die(3, "config region: %s", strerror(errno));
    if (pread(fd, &cmd, 2, (off_t)ri.offset + 4) != 2)
        die(3, "read COMMAND: %s", strerror(errno));
    cmd |= 0x6; /* MEM, BME */
    if (pwrite(fd, &cmd, 2, (off_t)ri.offset + 4) != 2)
        die(3, "write COMMAND: %s", strerror(errno));
}

static struct vdev vfio_device(struct vfio *v, const char *bdf, int want_hvt)
{
    struct vdev vd = {.d = {.bdf = bdf}};
    char path[256], link[256];
    vfio_bind(bdf);
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0)
        die(3, "%s: %s (no IOMMU group: is the guest's IOMMU on?)", path, strerror(errno));
    link[n] = 0;
    snprintf(path, sizeof path, "/dev/vfio/%s", basename(link));
    for (int i = 0; i < 100 && access(path, F_OK); i++)
        usleep(20000); /* devtmpfs creates the node as vfio-pci binds */
    vd.group = open(path, O_RDWR);
    if (vd.group < 0)
        die(3, "%s: %s", path, strerror(errno));
    struct vfio_group_status gs = {.argsz = sizeof gs};
    if (ioctl(vd.group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
        die(3, "group %s is not viable (other devices in it are bound elsewhere)", path);
    if (ioctl(vd.group, VFIO_GROUP_SET_CONTAINER, &v->container))
        die(3, "VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
    if (!v->iommu_set) {
        if (ioctl(v->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
            die(3, "VFIO_SET_IOMMU: %s", strerror(errno));
        v->iommu_set = 1;
    }
    vd.fd = ioctl(vd.group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (vd.fd < 0)
        die(3, "VFIO_GROUP_GET_DEVICE_FD %s: %s", bdf, strerror(errno));
    vfio_enable_bus_master(vd.fd);
    uint64_t size;
    vd.d.bar0 = vfio_region(vd.fd, VFIO_PCI_BAR0_REGION_INDEX, &size);
    if (want_hvt) {
        vd.d.bar2 = vfio_region(vd.fd, VFIO_PCI_BAR2_REGION_INDEX, &size);
        if (rd32(&vd.d, R_ID) != HVT_ID)
            die(3, "%s: ID register %#x, not hvt-pci's %#x", bdf, rd32(&vd.d, R_ID), HVT_ID);
        vd.caps = rd32(&vd.d, R_CAPS);
    }
    return vd;
}

static void vfio_map(const struct vfio *v, void *buf, uint64_t iova, size_t size)
{
    struct vfio_iommu_type1_dma_map m = {
        .argsz = sizeof m,
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)buf,
        .iova = iova,
        .size = size,
    };
    if (ioctl(v->container, VFIO_IOMMU_MAP_DMA, &m))
        die(3, "VFIO_IOMMU_MAP_DMA iova %#llx size %zu: %s", (unsigned long long)iova, size,
            strerror(errno));
}

static const char *level_name(uint32_t caps)
{
    return CAPS_LEVEL(caps) == 0 ? "trusted" : CAPS_LEVEL(caps) == 1 ? "confidential" : "?";
}

/* The BDF argument, else the only hvt-pci device. */
static const char *pick_bdf(const char *given)
{
    static char found[256];
    int n = 0;
    if (given)
        return given;
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    if (!dir)
        die(3, "/sys/bus/pci/devices: %s", strerror(errno));
    while ((e = readdir(dir)))
        if (e->d_name[0] != '.' && is_hvt(e->d_name, 0x1234, 0x11f0) && n++ == 0)
            snprintf(found, sizeof found, "%s", e->d_name);
    closedir(dir);
    if (n != 1)
        die(3, "%d hvt-pci devices: name one", n);
    return found;
}

/* Register the bounce window, or accept the same one already there (it stays locked until
 * the device is reset, and vfio-pci has no reset for a function without FLR). */
static void register_window(const struct dev *d, uint64_t base, uint32_t size)
{
    if (rd32(d, R_WIN_CTRL) & 1) {
        if (rd64(d, R_WIN_BASE) != base || rd32(d, R_WIN_SIZE) != size || rd32(d, R_WIN_PASID))
            die(3, "%s: another window (%#llx, %#x) is registered and locked until reset",
                d->bdf, (unsigned long long)rd64(d, R_WIN_BASE), rd32(d, R_WIN_SIZE));
        return;
    }
    wr64(d, R_WIN_BASE, base);
    wr32(d, R_WIN_SIZE, size);
    wr32(d, R_WIN_PASID, 0); /* the window is for requests without PASID */
    wr32(d, R_WIN_CTRL, 1);
}

/* IOVA layout of the vfio commands (one container for both devices). */
#define IOVA_WINDOW 0x10000000ull  /* the bounce window */
#define IOVA_OUTSIDE 0x20000000ull /* a mapped buffer outside any window */
#define IOVA_DEST 0x40000000ull    /* the bench's destination */

static int cmd_vfio_check(int argc, char **argv)
{
    if (argc > 1)
        die(2, "usage: hvtdma vfio-check [BDF]");
    const char *bdf = pick_bdf(argc ? argv[0] : NULL);
    struct vfio v = vfio_open();
    const size_t wsize = 64 * 1024, len = 16 * 1024;
    struct vdev vd = vfio_device(&v, bdf, 1); /* sets the container's IOMMU: map after */
    uint8_t *window = alloc_pages(wsize), *outside = alloc_pages(wsize);
    vfio_map(&v, window, IOVA_WINDOW, wsize);
    vfio_map(&v, outside, IOVA_OUTSIDE, wsize);
    const struct dev *d = &vd.d;
    struct dma_res r;
    printf("device=%s caps=%#x level=%s\n", bdf, vd.caps, level_name(vd.caps));
    if (rd32(d, R_WIN_CTRL) & 1)
        die(3, "%s already has a window: vfio-check needs a device fresh from reset", bdf);
    fill((void *)d->bar2, len, 0x5EC0u);
    uint32_t blocked0 = rd32(d, R_BLOCKED);

    if (CAPS_LEVEL(vd.caps) == 1) {
        memset(outside, 0xAA, wsize);
        r = dma(d, 0, IOVA_OUTSIDE, len, 0, DIR_DEV2MEM);
        check("confidential-no-window-blocked",
              (r.status & ST_ERROR) && r.code == CODE_BLOCKED && r.xferred == 0 &&
                  rd32(d, R_BLOCKED) == blocked0 + 1 && all_bytes(outside, wsize, 0xAA),
              "status=%#x code=%u blocked=+%u untouched=%d", r.status, r.code,
              rd32(d, R_BLOCKED) - blocked0, all_bytes(outside, wsize, 0xAA));

        register_window(d, IOVA_WINDOW, (uint32_t)wsize);
        wr64(d, R_WIN_BASE, IOVA_OUTSIDE); /* locked: ignored */
        wr32(d, R_WIN_SIZE, 2 * (uint32_t)wsize);
        wr32(d, R_WIN_CTRL, 0);
        check("confidential-window-locked",
              rd64(d, R_WIN_BASE) == IOVA_WINDOW && rd32(d, R_WIN_SIZE) == wsize &&
                  (rd32(d, R_WIN_CTRL) & 1),
              "base=%#llx size=%#x ctrl=%#x", (unsigned long long)rd64(d, R_WIN_BASE),
              rd32(d, R_WIN_SIZE), rd32(d, R_WIN_CTRL));

        memset(window, 0, wsize);
        r = dma(d, 0, IOVA_WINDOW + PAGE, len, 0, DIR_DEV2MEM);
        check("confidential-writes-inside-window",
              dma_ok(&r) && !memcmp(window + PAGE, (void *)d->bar2, len) &&
                  all_bytes(window, PAGE, 0),
              "status=%#x code=%u xferred=%u", r.status, r.code, r.xferred);

        blocked0 = rd32(d, R_BLOCKED);
        r = dma(d, 0, IOVA_OUTSIDE, len, 0, DIR_DEV2MEM);
        check("confidential-write-outside-blocked",
              (r.status & ST_ERROR) && r.code == CODE_BLOCKED && r.xferred == 0 &&
                  r.fault_addr == IOVA_OUTSIDE && rd32(d, R_BLOCKED) == blocked0 + 1 &&
                  all_bytes(outside, wsize, 0xAA),
              "status=%#x code=%u fault_addr=%#llx blocked=+%u untouched=%d", r.status,
              r.code, (unsigned long long)r.fault_addr, rd32(d, R_BLOCKED) - blocked0,
              all_bytes(outside, wsize, 0xAA));

        memset(window, 0x55, wsize);
        r = dma(d, 0, IOVA_WINDOW + wsize - PAGE, 2 * PAGE, 0, DIR_DEV2MEM);
        check("confidential-straddling-end-blocked",
              (r.status & ST_ERROR) && r.code == CODE_BLOCKED &&
                  r.fault_addr == IOVA_WINDOW + wsize && all_bytes(window, wsize, 0x55),
              "status=%#x code=%u fault_addr=%#llx window_untouched=%d", r.status, r.code,
              (unsigned long long)r.fault_addr, all_bytes(window, wsize, 0x55));

        fill(window, PAGE, 0x1234u);
        r = dma(d, IOVA_WINDOW, 8 * PAGE, PAGE, 0, DIR_MEM2DEV);
        check("confidential-reads-from-window",
              dma_ok(&r) && !memcmp((void *)(d->bar2 + 8 * PAGE), window, PAGE),
              "status=%#x code=%u", r.status, r.code);
        r = dma(d, IOVA_OUTSIDE, 8 * PAGE, PAGE, 0, DIR_MEM2DEV);
        check("confidential-read-outside-blocked",
              (r.status & ST_ERROR) && r.code == CODE_BLOCKED, "status=%#x code=%u", r.status,
              r.code);
    } else {
        memset(outside, 0xAA, wsize);
        r = dma(d, 0, IOVA_OUTSIDE, len, 0, DIR_DEV2MEM);
        check("trusted-writes-without-window", dma_ok(&r) && !memcmp(outside, (void *)d->bar2, len),
              "status=%#x code=%u", r.status, r.code);
        register_window(d, IOVA_WINDOW, (uint32_t)wsize); /* not checked for a trusted device */
        memset(outside, 0xAA, wsize);
        r = dma(d, 0, IOVA_OUTSIDE, len, 0, DIR_DEV2MEM);
        check("trusted-writes-outside-window",
              dma_ok(&r) && !memcmp(outside, (void *)d->bar2, len) && rd32(d, R_BLOCKED) == 0,
              "status=%#x code=%u blocked=%u", r.status, r.code, rd32(d, R_BLOCKED));
        r = dma(d, 0, 0x7f000000ull, PAGE, 0, DIR_DEV2MEM); /* mapped nowhere */
        check("trusted-unmapped-iova-faults",
              (r.status & ST_ERROR) && r.code == CODE_WRITE_FAULT && r.fault_addr == 0x7f000000ull,
              "status=%#x code=%u fault_addr=%#llx", r.status, r.code,
              (unsigned long long)r.fault_addr);
    }
    printf("blocked=%u completed=%u\n", rd32(d, R_BLOCKED), rd32(d, R_COMPLETED));
    return failures ? 1 : 0;
}

static int cmd_vfio_bench(int argc, char **argv)
{
    const char *given = NULL, *mode = NULL;
    uint32_t total_mib = 64, chunk = SRAM_SIZE;
    int runs = 1;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--mode") && i + 1 < argc)
            mode = argv[++i];
        else if (!strcmp(argv[i], "--total") && i + 1 < argc)
            total_mib = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--chunk") && i + 1 < argc)
            chunk = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
            runs = atoi(argv[++i]);
        else if (argv[i][0] != '-' && !given)
            given = argv[i];
        else
            die(2, "vfio-bench: unknown argument %s", argv[i]);
    }
    if (!mode || (strcmp(mode, "direct") && strcmp(mode, "bounce")))
        die(2, "vfio-bench needs --mode direct|bounce");
    if (!chunk || chunk % PAGE || chunk > SRAM_SIZE || runs < 1 || !total_mib ||
        ((uint64_t)total_mib << 20) % chunk)
        die(2, "bad --chunk/--total/--runs");
    int bounce = !strcmp(mode, "bounce");
    const char *bdf = pick_bdf(given);
    size_t total = (size_t)total_mib << 20;
    struct vfio v = vfio_open();
    struct vdev vd = vfio_device(&v, bdf, 1);
    uint8_t *dest = alloc_pages(total), *window = alloc_pages(chunk);
    vfio_map(&v, dest, IOVA_DEST, total);
    vfio_map(&v, window, IOVA_WINDOW, chunk);
    const struct dev *d = &vd.d;
    if (bounce)
        register_window(d, IOVA_WINDOW, chunk);
    fill((void *)d->bar2, chunk, 0xD1EC7u);
    printf("device=%s level=%s mode=%s total=%zu chunk=%u\n", bdf, level_name(vd.caps), mode,
           total, chunk);
    for (int run = 0; run < runs; run++) {
        memset(dest, 0, total);
        double t0 = now(), copy = 0;
        for (size_t off = 0; off < total; off += chunk) {
            struct dma_res r = dma(d, 0, bounce ? IOVA_WINDOW : IOVA_DEST + off, chunk, 0,
                                   DIR_DEV2MEM);
            if (!dma_ok(&r))
                die(1, "%s DMA at %zu: status %#x code %u", mode, off, r.status, r.code);
            if (bounce) {
                double c0 = now();
                memcpy(dest + off, window, chunk);
                copy += now() - c0;
            }
        }
        double dt = now() - t0;
        for (size_t off = 0; off < total; off += chunk)
            if (memcmp(dest + off, (const void *)d->bar2, chunk))
                die(1, "%s: the destination differs from the SRAM at %zu", mode, off);
        printf("run %d mibps=%.1f seconds=%.4f copy_seconds=%.4f\n", run,
               (double)total / (1 << 20) / dt, dt, copy);
    }
    return 0;
}

/* -- edu: the plumbing on stock QEMU -------------------------------------------------------- */

static int edu_dma(const struct dev *d, uint64_t src, uint64_t dst, uint32_t cnt, int to_ram)
{
    *(volatile uint64_t *)(d->bar0 + EDU_DMA_SRC) = src;
    *(volatile uint64_t *)(d->bar0 + EDU_DMA_DST) = dst;
    *(volatile uint64_t *)(d->bar0 + EDU_DMA_CNT) = cnt;
    *(volatile uint64_t *)(d->bar0 + EDU_DMA_CMD) = 1u | (to_ram ? 2u : 0u);
    double deadline = now() + 30;
    while (rd32(d, EDU_DMA_CMD) & 1u) /* the DMA runs from a timer 100 ms later */
        if (now() > deadline)
            return -1;
    return 0;
}

static int cmd_edu(int argc, char **argv)
{
    if (argc < 1 || (strcmp(argv[0], "kmod") && strcmp(argv[0], "vfio")) ||
        (!strcmp(argv[0], "vfio") && argc < 2))
        die(2, "usage: hvtdma edu kmod | hvtdma edu vfio BDF");
    const uint64_t iova_src = 0x100000, iova_dst = 0x200000; /* below edu's 28-bit DMA mask */
    uint8_t *src = alloc_pages(PAGE), *dst = alloc_pages(PAGE);
    fill(src, PAGE, 0xEDu);
    memset(dst, 0, PAGE);
    struct dev d;
    if (!strcmp(argv[0], "kmod")) {
        struct kmod k = kmod_open();
        printf("device=%s pasid=%u flags=%#x\n", k.info.bdf, k.info.pasid, k.info.flags);
        d = (struct dev){.bdf = k.info.bdf, .bar0 = map_resource(k.info.bdf, 0, 1 << 20)};
        int e;
        if ((e = kmod_map(&k, src, iova_src, PAGE, HVTP_READ)) ||
            (e = kmod_map(&k, dst, iova_dst, PAGE, HVTP_READ | HVTP_WRITE)))
            die(3, "HVTP_MAP: %s", strerror(-e));
        /* kept open: the mappings live as long as the file */
    } else {
        struct vfio v = vfio_open();
        struct vdev vd = vfio_device(&v, argv[1], 0);
        d = vd.d;
        vfio_map(&v, src, iova_src, PAGE);
        vfio_map(&v, dst, iova_dst, PAGE);
    }
    uint32_t id = rd32(&d, 0);
    printf("edu id=%#x\n", id);
    if ((id & EDU_ID_MASK) != EDU_ID)
        die(3, "%s is not an edu device (id %#x)", d.bdf, id);
    int ok = !edu_dma(&d, iova_src, EDU_BUF, PAGE, 0) && !edu_dma(&d, EDU_BUF, iova_dst, PAGE, 1);
    int same = !memcmp(src, dst, PAGE);
    check("edu-roundtrip", ok && same, "dma_done=%d bytes_match=%d", ok, same);
    return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        die(2, "usage: hvtdma list | pasid | vfio-check | vfio-bench | edu (see the source)");
    const char *cmd = argv[1];
    if (!strcmp(cmd, "list"))
        return cmd_list();
    if (!strcmp(cmd, "pasid"))
        return cmd_pasid(argc - 2, argv + 2);
    if (!strcmp(cmd, "vfio-check"))
        return cmd_vfio_check(argc - 2, argv + 2);
    if (!strcmp(cmd, "vfio-bench"))
        return cmd_vfio_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "edu"))
        return cmd_edu(argc - 2, argv + 2);
    die(2, "unknown command %s", cmd);
    return 2;
}
