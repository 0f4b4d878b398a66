/*
 * hvagent - the hvtools guest agent.
 *
 * Serves requests from the host over one virtio-serial port (/dev/vportNpM): PING, and EXEC,
 * which runs a command and streams its stdout/stderr back, then its exit status. The wire
 * format is documented in hvtools/guest/protocol.py; the two must agree.
 *
 * One single-threaded poll loop. When the host side of the port is not connected the port
 * polls POLLHUP; the agent then kills running commands, drops what it had queued (except the
 * rest of a frame already partly written, so the stream stays frame-aligned), and sleeps in
 * short steps until the host is back. Incoming bytes are resynchronised on the frame magic and
 * the header CRC, so stale fragments from an earlier connection are skipped.
 *
 * Usage: hvagent PORT_DEVICE
 * Build: gcc -static -O2 -o hvagent hvagent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/sysinfo.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC0 'H'
#define MAGIC1 'V'
#define MAGIC2 'A'
#define MAGIC3 'G'
#define PROTO_VERSION 1
#define HDR_LEN 20
#define MAX_PAYLOAD (1u << 20)
#define MAX_ARGS 4096
#define CHUNK 16384
#define OUT_HIGH (512 * 1024)
#define MAX_JOBS 8
#define IDLE_SLEEP_MS 50
#define DRAIN_GRACE_MS 250

enum frame_type {
    T_PING = 1,
    T_PONG = 2,
    T_EXEC = 3,
    T_STDOUT = 4,
    T_STDERR = 5,
    T_EXIT = 6,
    T_ERROR = 7,
};

enum exit_kind { K_EXITED = 0, K_SIGNALED = 1, K_TIMEOUT = 2 };

/* -- small utilities ------------------------------------------------------------------------ */

static void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("hvagent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CRC-32 (IEEE 802.3, reflected, as zlib.crc32). */
static uint32_t crc32_ieee(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return c ^ 0xffffffffu;
}

static void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* -- outgoing frame queue ------------------------------------------------------------------- */

struct frame {
    struct frame *next;
    size_t len;
    size_t sent;
    uint8_t data[];
};

static struct frame *outq_head, *outq_tail;
static size_t outq_bytes;
static int connected;

/* Queue a frame for the host; dropped when the host is not connected. */
static void send_frame(uint8_t type, uint32_t id, const void *payload, size_t len)
{
    if (!connected)
        return;
    if (len > MAX_PAYLOAD)
        len = MAX_PAYLOAD;
    struct frame *f = malloc(sizeof(*f) + HDR_LEN + len);
    if (!f) {
        logmsg("out of memory queueing %zu bytes", len);
        return;
    }
    uint8_t *h = f->data;
    h[0] = MAGIC0; h[1] = MAGIC1; h[2] = MAGIC2; h[3] = MAGIC3;
    h[4] = PROTO_VERSION;
    h[5] = type;
    put_u16(h + 6, 0);
    put_u32(h + 8, id);
    put_u32(h + 12, (uint32_t)len);
    put_u32(h + 16, crc32_ieee(h, 16));
    if (len)
        memcpy(h + HDR_LEN, payload, len);
    f->len = HDR_LEN + len;
    f->sent = 0;
    f->next = NULL;
    if (outq_tail)
        outq_tail->next = f;
    else
        outq_head = f;
    outq_tail = f;
    outq_bytes += f->len;
}

static void send_error(uint32_t id, int32_t status, int32_t err, const char *fmt, ...)
{
    uint8_t buf[8 + 512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)buf + 8, sizeof(buf) - 8, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof(buf) - 9)
        n = (int)(sizeof(buf) - 9);
    put_u32(buf, (uint32_t)status);
    put_u32(buf + 4, (uint32_t)err);
    send_frame(T_ERROR, id, buf, 8 + (size_t)n);
}

/* Drop queued frames, keeping the rest of one already partly written. */
static void drop_queue(void)
{
    struct frame *keep = NULL, *f = outq_head;
    while (f) {
        struct frame *next = f->next;
        if (f == outq_head && f->sent > 0) {
            keep = f;
            keep->next = NULL;
        } else {
            free(f);
        }
        f = next;
    }
    outq_head = outq_tail = keep;
    outq_bytes = keep ? keep->len - keep->sent : 0;
}

/* Write as much of the queue as the port takes. Returns -1 on a hard error. */
static int flush_queue(int port)
{
    while (outq_head) {
        struct frame *f = outq_head;
        ssize_t n = write(port, f->data + f->sent, f->len - f->sent);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        f->sent += (size_t)n;
        outq_bytes -= (size_t)n;
        if (f->sent == f->len) {
            outq_head = f->next;
            if (!outq_head)
                outq_tail = NULL;
            free(f);
        }
    }
    return 0;
}

/* -- jobs (running commands) ---------------------------------------------------------------- */

struct job {
    int used;
    uint32_t id;
    pid_t pid;
    int out_fd, err_fd, in_fd;
    uint8_t *in_buf;
    size_t in_len, in_off;
    int reaped;
    int wstatus;
    int timed_out;
    int64_t start_ns, deadline_ns, reaped_ns, end_ns;
};

static struct job jobs[MAX_JOBS];

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void free_job(struct job *j)
{
    close_fd(&j->out_fd);
    close_fd(&j->err_fd);
    close_fd(&j->in_fd);
    free(j->in_buf);
    memset(j, 0, sizeof(*j));
    j->out_fd = j->err_fd = j->in_fd = -1;
}

static void kill_job(struct job *j)
{
    if (!j->reaped && j->pid > 0) {
        kill(-j->pid, SIGKILL);
        kill(j->pid, SIGKILL);
    }
}

static void finish_job(struct job *j)
{
    uint8_t p[16];
    int32_t status;
    uint8_t kind, sig = 0;
    if (WIFSIGNALED(j->wstatus)) {
        sig = (uint8_t)WTERMSIG(j->wstatus);
        status = 128 + sig;
        kind = K_SIGNALED;
    } else {
        status = WEXITSTATUS(j->wstatus);
        kind = K_EXITED;
    }
    if (j->timed_out)
        kind = K_TIMEOUT;
    put_u32(p, (uint32_t)status);
    p[4] = kind;
    p[5] = sig;
    put_u16(p + 6, 0);
    put_u64(p + 8, (uint64_t)(j->reaped_ns - j->start_ns));
    send_frame(T_EXIT, j->id, p, sizeof(p));
    free_job(j);
}

/* Read one chunk from a child's output pipe; closes it at EOF. */
static void pump_output(struct job *j, int *fd, uint8_t type)
{
    static uint8_t buf[CHUNK];
    ssize_t n = read(*fd, buf, sizeof(buf));
    if (n > 0)
        send_frame(type, j->id, buf, (size_t)n);
    else if (n == 0 || (errno != EAGAIN && errno != EINTR))
        close_fd(fd);
}

/* Read what a pipe holds now; close it once it is empty (EAGAIN) or at EOF. */
static void drain_and_close(struct job *j, int *fd, uint8_t type)
{
    static uint8_t buf[CHUNK];
    for (int k = 0; *fd >= 0 && k < 16; k++) {
        ssize_t n = read(*fd, buf, sizeof(buf));
        if (n > 0)
            send_frame(type, j->id, buf, (size_t)n);
        else if (n < 0 && errno == EINTR)
            continue;
        else
            close_fd(fd);
    }
}

static void pump_input(struct job *j)
{
    while (j->in_off < j->in_len) {
        ssize_t n = write(j->in_fd, j->in_buf + j->in_off, j->in_len - j->in_off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            break; /* EPIPE: the child does not read its stdin */
        }
        j->in_off += (size_t)n;
    }
    close_fd(&j->in_fd);
}

static void child_exec(char **argv, int in_fd, int out_fd, int err_fd, int errpipe)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
    setsid();
    dup2(in_fd, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    for (int fd = 3; fd < 1024; fd++)
        if (fd != errpipe)
            close(fd);
    if (chdir("/") < 0) { /* keep going */ }
    clearenv();
    setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin", 1);
    setenv("HOME", "/root", 1);
    setenv("TERM", "dumb", 1);
    execvp(argv[0], argv);
    int e = errno;
    ssize_t w = write(errpipe, &e, sizeof(e));
    (void)w;
    _exit(127);
}

/* EXEC payload: u32 timeout_ms, u32 flags, u32 argc, u32 stdin_len, argv (NUL-terminated
 * strings), stdin bytes. */
static void start_exec(uint32_t id, const uint8_t *p, size_t len)
{
    if (len < 16) {
        send_error(id, -1, EINVAL, "EXEC payload too short (%zu bytes)", len);
        return;
    }
    uint32_t timeout_ms = get_u32(p), argc = get_u32(p + 8), in_len = get_u32(p + 12);
    if (argc < 1 || argc > MAX_ARGS) {
        send_error(id, -1, EINVAL, "bad argc %u", argc);
        return;
    }
    if (in_len > len - 16) {
        send_error(id, -1, EINVAL, "stdin length %u exceeds payload", in_len);
        return;
    }
    const uint8_t *s = p + 16, *end = p + len - in_len;
    char **argv = calloc(argc + 1, sizeof(char *));
    if (!argv) {
        send_error(id, -1, ENOMEM, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < argc; i++) {
        const uint8_t *nul = memchr(s, 0, (size_t)(end - s));
        if (!nul) {
            send_error(id, -1, EINVAL, "argv[%u] is not NUL-terminated", i);
            free(argv);
            return;
        }
        argv[i] = (char *)s;
        s = nul + 1;
    }
    if (s != end) {
        send_error(id, -1, EINVAL, "%zu stray bytes after argv", (size_t)(end - s));
        free(argv);
        return;
    }

    struct job *j = NULL;
    for (int i = 0; i < MAX_JOBS; i++)
        if (!jobs[i].used) {
            j = &jobs[i];
            break;
        }
    if (!j) {
        send_error(id, -1, EBUSY, "agent busy: %d commands running", MAX_JOBS);
        free(argv);
        return;
    }

    int out[2] = {-1, -1}, err[2] = {-1, -1}, in[2] = {-1, -1}, ep[2] = {-1, -1};
    int ok = pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0 &&
             pipe2(ep, O_CLOEXEC) == 0;
    if (ok && in_len > 0)
        ok = pipe2(in, O_CLOEXEC) == 0;
    else if (ok)
        ok = (in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;
    int64_t start = now_ns();
    pid_t pid = ok ? fork() : -1;
    if (pid == 0)
        child_exec(argv, in[0], out[1], err[1], ep[1]);
    int e = errno;
    close_fd(&out[1]);
    close_fd(&err[1]);
    close_fd(&in[0]);
    close_fd(&ep[1]);
    free(argv);
    if (pid < 0) {
        close_fd(&out[0]);
        close_fd(&err[0]);
        close_fd(&in[1]);
        close_fd(&ep[0]);
        send_error(id, -1, e, "cannot start command: %s", strerror(e));
        return;
    }

    int child_errno = 0;
    ssize_t n;
    do
        n = read(ep[0], &child_errno, sizeof(child_errno));
    while (n < 0 && errno == EINTR);
    close_fd(&ep[0]);
    if (n == (ssize_t)sizeof(child_errno)) {
        /* exec failed: the child has exited with 127; report like a shell would */
        int ws;
        while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
            ;
        close_fd(&out[0]);
        close_fd(&err[0]);
        close_fd(&in[1]);
        int status = (child_errno == ENOENT || child_errno == ENOTDIR) ? 127 : 126;
        send_error(id, status, child_errno, "%s: %s", (const char *)(p + 16),
                   status == 127 ? "command not found" : strerror(child_errno));
        return;
    }

    memset(j, 0, sizeof(*j));
    j->used = 1;
    j->id = id;
    j->pid = pid;
    j->out_fd = out[0];
    j->err_fd = err[0];
    j->in_fd = in[1];
    set_nonblock(j->out_fd);
    set_nonblock(j->err_fd);
    if (j->in_fd >= 0) {
        set_nonblock(j->in_fd);
        j->in_buf = malloc(in_len);
        if (j->in_buf) {
            memcpy(j->in_buf, end, in_len);
            j->in_len = in_len;
        } else {
            close_fd(&j->in_fd);
        }
    }
    j->start_ns = start;
    j->deadline_ns = timeout_ms ? start + (int64_t)timeout_ms * 1000000 : 0;
}

static void reap_children(void)
{
    int ws;
    pid_t pid;
    while ((pid = waitpid(-1, &ws, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (j->used && !j->reaped && j->pid == pid) {
                j->reaped = 1;
                j->wstatus = ws;
                j->reaped_ns = now_ns();
                close_fd(&j->in_fd);
            }
        }
    }
}

/* -- incoming frames ------------------------------------------------------------------------ */

static uint8_t inbuf[HDR_LEN + MAX_PAYLOAD + CHUNK];
static size_t in_len;
static size_t in_discard; /* payload bytes of a rejected frame still to skip */

static void handle_ping(uint32_t id)
{
    char buf[512];
    struct utsname u;
    struct sysinfo si;
    struct timespec ts;
    uname(&u);
    clock_gettime(CLOCK_BOOTTIME, &ts);
    sysinfo(&si);
    int n = snprintf(buf, sizeof(buf),
                     "proto=%d%crelease=%s%cmachine=%s%chostname=%s%cuptime_ms=%lld%c"
                     "pid=%d%cmem_total_kb=%lu%c",
                     PROTO_VERSION, 0, u.release, 0, u.machine, 0, u.nodename, 0,
                     (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, 0, (int)getpid(), 0,
                     (unsigned long)(si.totalram / 1024 * si.mem_unit), 0);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof(buf))
        n = sizeof(buf);
    send_frame(T_PONG, id, buf, (size_t)n);
}

static void handle_frame(uint8_t type, uint32_t id, const uint8_t *p, size_t len)
{
    switch (type) {
    case T_PING:
        handle_ping(id);
        break;
    case T_EXEC:
        start_exec(id, p, len);
        break;
    default:
        send_error(id, -1, EINVAL, "unexpected frame type %u from host", type);
    }
}

static void consume(size_t n)
{
    memmove(inbuf, inbuf + n, in_len - n);
    in_len -= n;
}

/* Parse every complete frame in inbuf, resyncing on the magic and the header CRC. */
static void parse_input(void)
{
    for (;;) {
        if (in_discard) {
            size_t n = in_discard < in_len ? in_discard : in_len;
            consume(n);
            in_discard -= n;
            if (in_discard)
                return;
        }
        size_t i = 0;
        while (i < in_len && inbuf[i] != MAGIC0)
            i++;
        if (i)
            consume(i);
        if (in_len < HDR_LEN)
            return;
        const uint8_t *h = inbuf;
        if (h[1] != MAGIC1 || h[2] != MAGIC2 || h[3] != MAGIC3 ||
            get_u32(h + 16) != crc32_ieee(h, 16)) {
            consume(1);
            continue;
        }
        uint32_t id = get_u32(h + 8), plen = get_u32(h + 12);
        if (h[4] != PROTO_VERSION) {
            send_error(id, -1, EPROTO, "protocol version %u not supported (agent speaks %d)",
                       h[4], PROTO_VERSION);
            consume(HDR_LEN);
            in_discard = plen;
            continue;
        }
        if (plen > MAX_PAYLOAD) {
            send_error(id, -1, EMSGSIZE, "frame of %u bytes exceeds the limit of %u", plen,
                       MAX_PAYLOAD);
            consume(HDR_LEN);
            in_discard = plen;
            continue;
        }
        if (in_len < HDR_LEN + plen)
            return;
        handle_frame(h[5], id, inbuf + HDR_LEN, plen);
        consume(HDR_LEN + plen);
    }
}

/* -- connection state ----------------------------------------------------------------------- */

static void on_disconnect(int port)
{
    connected = 0;
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used)
            kill_job(&jobs[i]);
    drop_queue();
    /* discard what the host wrote before it went away */
    uint8_t junk[4096];
    while (read(port, junk, sizeof(junk)) > 0)
        ;
    in_len = 0;
    in_discard = 0;
}

static int host_connected(int port)
{
    struct pollfd p = {.fd = port, .events = POLLIN};
    if (poll(&p, 1, 0) < 0)
        return 0;
    return !(p.revents & (POLLHUP | POLLERR | POLLNVAL));
}

/* -- main loop ------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: hvagent PORT_DEVICE\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        logmsg("signalfd: %s", strerror(errno));
        return 1;
    }
    for (int i = 0; i < MAX_JOBS; i++)
        free_job(&jobs[i]);

    int port;
    while ((port = open(argv[1], O_RDWR | O_NONBLOCK | O_CLOEXEC)) < 0) {
        if (errno != ENOENT && errno != EBUSY && errno != ENXIO) {
            logmsg("open %s: %s", argv[1], strerror(errno));
            return 1;
        }
        usleep(100 * 1000);
    }

    for (;;) {
        if (!connected && host_connected(port)) {
            connected = 1;
            in_len = 0;
            in_discard = 0;
        }

        struct pollfd pfd[2 + 3 * MAX_JOBS];
        struct {
            struct job *job;
            int which;
        } owner[2 + 3 * MAX_JOBS];
        nfds_t n = 0;
        pfd[n] = (struct pollfd){.fd = sfd, .events = POLLIN};
        owner[n++].job = NULL;
        int port_slot = -1;
        if (connected) {
            port_slot = (int)n;
            pfd[n] = (struct pollfd){.fd = port, .events = POLLIN | (outq_head ? POLLOUT : 0)};
            owner[n++].job = NULL;
        }
        int64_t now = now_ns(), wake = -1;
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            int want_out = outq_bytes < OUT_HIGH || !connected;
            if (j->out_fd >= 0 && want_out) {
                pfd[n] = (struct pollfd){.fd = j->out_fd, .events = POLLIN};
                owner[n].job = j;
                owner[n++].which = 1;
            }
            if (j->err_fd >= 0 && want_out) {
                pfd[n] = (struct pollfd){.fd = j->err_fd, .events = POLLIN};
                owner[n].job = j;
                owner[n++].which = 2;
            }
            if (j->in_fd >= 0) {
                pfd[n] = (struct pollfd){.fd = j->in_fd, .events = POLLOUT};
                owner[n].job = j;
                owner[n++].which = 0;
            }
            int64_t t = -1;
            if (!j->reaped && j->deadline_ns && !j->timed_out)
                t = j->deadline_ns;
            else if (j->reaped)
                t = j->reaped_ns + (int64_t)DRAIN_GRACE_MS * 1000000;
            if (t >= 0 && (wake < 0 || t < wake))
                wake = t;
        }
        int timeout_ms = -1;
        if (wake >= 0)
            timeout_ms = wake <= now ? 0 : (int)((wake - now) / 1000000 + 1);
        if (!connected && (timeout_ms < 0 || timeout_ms > IDLE_SLEEP_MS))
            timeout_ms = IDLE_SLEEP_MS;

        int r = poll(pfd, n, timeout_ms);
        if (r < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep(1);
            continue;
        }

        if (r > 0 && (pfd[0].revents & POLLIN)) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                ;
        }
        reap_children();

        if (r > 0 && port_slot >= 0) {
            short ev = pfd[port_slot].revents;
            if (ev & (POLLHUP | POLLERR | POLLNVAL)) {
                on_disconnect(port);
                continue;
            }
            if (ev & POLLIN) {
                ssize_t got = read(port, inbuf + in_len, sizeof(inbuf) - in_len);
                if (got > 0) {
                    in_len += (size_t)got;
                    parse_input();
                } else if (got == 0) {
                    on_disconnect(port);
                    continue;
                }
            }
        }
        for (nfds_t k = 0; r > 0 && k < n; k++) {
            struct job *j = owner[k].job;
            if (!j || !pfd[k].revents || !j->used)
                continue;
            if (owner[k].which == 1 && j->out_fd == pfd[k].fd)
                pump_output(j, &j->out_fd, T_STDOUT);
            else if (owner[k].which == 2 && j->err_fd == pfd[k].fd)
                pump_output(j, &j->err_fd, T_STDERR);
            else if (owner[k].which == 0 && j->in_fd == pfd[k].fd)
                pump_input(j);
        }

        now = now_ns();
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            if (!j->reaped && j->deadline_ns && !j->timed_out && now >= j->deadline_ns) {
                j->timed_out = 1;
                kill_job(j);
            }
            if (j->reaped) {
                int grace_over = now >= j->reaped_ns + (int64_t)DRAIN_GRACE_MS * 1000000;
                if (grace_over) {
                    /* a background process keeps the pipes open: stop once they run dry */
                    drain_and_close(j, &j->out_fd, T_STDOUT);
                    drain_and_close(j, &j->err_fd, T_STDERR);
                }
                if (j->out_fd < 0 && j->err_fd < 0)
                    finish_job(j);
            }
        }

        if (connected && outq_head && flush_queue(port) < 0) {
            if (errno == EPIPE || errno == ENODEV)
                on_disconnect(port);
            else
                logmsg("write: %s", strerror(errno));
        }
    }
}
