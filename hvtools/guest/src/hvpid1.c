/*
 * hvpid1 - the idle PID 1 of the hvtools guest (the /init script execs it last).
 *
 * - reaps every orphan;
 * - optionally supervises one process and respawns its command when it dies (at most once a
 *   second): hvpid1 -s PID -- CMD [ARG...];
 * - shuts down on the signals busybox sends to PID 1 (poweroff: SIGUSR2, halt: SIGUSR1,
 *   reboot: SIGTERM) and on SIGPWR / ctrl-alt-del (SIGINT);
 * - powers off when an input device reports KEY_POWER (the ACPI power button, i.e. QEMU's
 *   system_powerdown; needs the button and evdev modules loaded before hvpid1 starts).
 *
 * Build: gcc -static -O2 -o hvpid1 hvpid1.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_INPUTS 16

static sigset_t handled;

static void shutdown_now(int how)
{
    sync();
    kill(-1, SIGTERM);
    for (int i = 0; i < 20; i++) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        usleep(25 * 1000);
    }
    kill(-1, SIGKILL);
    sync();
    reboot(how);
    _exit(1);
}

static pid_t spawn(char **cmd)
{
    pid_t pid = fork();
    if (pid == 0) {
        sigprocmask(SIG_UNBLOCK, &handled, NULL);
        execv(cmd[0], cmd);
        _exit(127);
    }
    return pid;
}

static int open_inputs(int *fds)
{
    int n = 0;
    DIR *d = opendir("/dev/input");
    if (!d)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAX_INPUTS) {
        if (strncmp(e->d_name, "event", 5) != 0)
            continue;
        char path[300];
        snprintf(path, sizeof(path), "/dev/input/%s", e->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0)
            fds[n++] = fd;
    }
    closedir(d);
    return n;
}

int main(int argc, char **argv)
{
    pid_t supervised = -1;
    char **cmd = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            supervised = (pid_t)atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--") && i + 1 < argc) {
            cmd = &argv[i + 1];
            break;
        } else {
            fprintf(stderr, "usage: hvpid1 [-s PID] [-- CMD [ARG...]]\n");
            break;
        }
    }

    sigemptyset(&handled);
    int sigs[] = {SIGCHLD, SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGPWR, SIGHUP};
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        sigaddset(&handled, sigs[i]);
    sigprocmask(SIG_BLOCK, &handled, NULL);
    int sfd = signalfd(-1, &handled, SFD_CLOEXEC);
    reboot(RB_DISABLE_CAD); /* ctrl-alt-del becomes SIGINT */

    struct pollfd pfd[1 + MAX_INPUTS];
    int inputs[MAX_INPUTS];
    int ninputs = open_inputs(inputs);
    pfd[0] = (struct pollfd){.fd = sfd, .events = POLLIN};
    for (int i = 0; i < ninputs; i++)
        pfd[1 + i] = (struct pollfd){.fd = inputs[i], .events = POLLIN};
    time_t last_spawn = 0;
    /* Start the command only now that the power button is being watched, so an ACPI
     * powerdown sent as soon as the agent answers is never lost. */
    if (cmd && supervised < 0) {
        last_spawn = time(NULL);
        supervised = spawn(cmd);
    }

    for (;;) {
        if (poll(pfd, (nfds_t)(1 + ninputs), -1) < 0)
            continue;
        if (pfd[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
                switch (si.ssi_signo) {
                case SIGUSR2:
                case SIGPWR:
                case SIGINT:
                    shutdown_now(RB_POWER_OFF);
                    break;
                case SIGUSR1:
                    shutdown_now(RB_HALT_SYSTEM);
                    break;
                case SIGTERM:
                    shutdown_now(RB_AUTOBOOT);
                    break;
                default:
                    break;
                }
            }
            pid_t pid;
            while ((pid = waitpid(-1, NULL, WNOHANG)) > 0) {
                if (pid == supervised && cmd) {
                    time_t now = time(NULL);
                    if (now - last_spawn < 1)
                        sleep(1);
                    last_spawn = time(NULL);
                    supervised = spawn(cmd);
                }
            }
        }
        for (int i = 0; i < ninputs; i++) {
            if (!(pfd[1 + i].revents & POLLIN))
                continue;
            struct input_event ev[16];
            ssize_t n = read(inputs[i], ev, sizeof(ev));
            for (ssize_t k = 0; n > 0 && k < n / (ssize_t)sizeof(ev[0]); k++)
                if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER && ev[k].value == 1)
                    shutdown_now(RB_POWER_OFF);
        }
    }
}
