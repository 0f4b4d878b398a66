/* hvblkbench: block-device read benchmark run inside the guest (bench/vhost_blk.py).
 *
 *   hvblkbench DEVICE randread|seqread SECONDS [BLOCKSIZE]
 *
 * O_DIRECT reads at queue depth 1, so every op reaches the device (no page cache):
 * randread picks BLOCKSIZE-aligned offsets at random over the whole device, seqread walks it
 * in order and wraps. Prints one line: ops=N bytes=B seconds=S iops=X mibps=Y.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s DEVICE randread|seqread SECONDS [BLOCKSIZE]\n", argv[0]);
        return 2;
    }
    int random_mode = strcmp(argv[2], "randread") == 0;
    if (!random_mode && strcmp(argv[2], "seqread") != 0) {
        fprintf(stderr, "mode must be randread or seqread\n");
        return 2;
    }
    double seconds = atof(argv[3]);
    size_t bs = argc > 4 ? (size_t)strtoul(argv[4], NULL, 0) : (random_mode ? 4096 : 1 << 20);
    if (seconds <= 0 || bs < 512 || bs % 512) {
        fprintf(stderr, "bad SECONDS or BLOCKSIZE\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < bs) {
        fprintf(stderr, "%s: cannot get a size of at least one block\n", argv[1]);
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, bs)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uint64_t blocks = size / bs, ops = 0, bytes = 0, next = 0;
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    double start = now(), end = start + seconds, t = start;
    while (t < end) {
        uint64_t blk;
        if (random_mode) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17; /* xorshift64 */
            blk = x % blocks;
        } else {
            blk = next;
            next = (next + 1) % blocks;
        }
        ssize_t n = pread(fd, buf, bs, (off_t)(blk * bs));
        if (n != (ssize_t)bs) {
            perror("pread");
            return 1;
        }
        ops++;
        bytes += (uint64_t)n;
        if ((ops & 15) == 0 || !random_mode)
            t = now();
    }
    double took = now() - start;
    printf("ops=%llu bytes=%llu seconds=%.3f iops=%.1f mibps=%.2f\n",
           (unsigned long long)ops, (unsigned long long)bytes, took, ops / took,
           bytes / took / 1048576.0);
    return 0;
}
