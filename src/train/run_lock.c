// run_lock.c: see run_lock.h.
//
// flock rather than fcntl locks: an fcntl lock belongs to the process and goes when any of
// its descriptors of the file closes, so a second trainer in one process (Python) would
// neither be refused nor keep its lock once the first closed; an flock belongs to the open
// file and only our descriptor releases it. Linux emulates flock with fcntl locks over NFS,
// so it holds across hosts there too (Lustre needs its `flock` mount option).
#define _GNU_SOURCE
#include "train/run_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

int nm_run_lock_acquire(const char *run_dir, int *fd_out, nm_error *err) {
    *fd_out = -1;
    char path[4200];
    snprintf(path, sizeof(path), "%s/.lock", run_dir);
    // No O_TRUNC: until we hold the lock the file is the holder's, and its pid is the message.
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return nm_error_set(err, "%s: cannot open the run lock: %s (is the run directory writable?)", path, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char holder[256] = "";
        ssize_t n = pread(fd, holder, sizeof(holder) - 1, 0);
        close(fd);
        if (e != EWOULDBLOCK)
            return nm_error_set(err, "%s: cannot lock: %s (a file system without flock? Lustre needs -o flock)", path, strerror(e));
        holder[n > 0 ? n : 0] = '\0';
        holder[strcspn(holder, "\n")] = '\0';
        // The holder writes its line just after taking the lock: a reader between the two sees none.
        return nm_error_set(err, "%s is in use by %s; wait for it to finish or choose another --out", run_dir,
                            holder[0] ? holder : "another trainer (starting up)");
    }
    char host[128] = "?", when[64] = "?", line[320];
    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    time_t now = time(NULL);
    struct tm tm;
    if (localtime_r(&now, &tm)) strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
    int len = snprintf(line, sizeof(line), "pid %ld on host %s (started %s)\n", (long)getpid(), host, when);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, line, (size_t)len, 0) != len) {
        int e = errno;
        close(fd);
        return nm_error_set(err, "%s: cannot write the run lock: %s", path, strerror(e));
    }
    *fd_out = fd;
    return 0;
}

void nm_run_lock_release(int fd) {
    if (fd < 0) return;
    // Closing drops the flock. The file stays: were it removed, a trainer that had just opened
    // the old file could lock it while a third created and locked a new one.
    close(fd);
}
