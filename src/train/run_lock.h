// run_lock.h: one trainer per run directory (RUN_DIR/.lock).
//
// Two trainers on one run directory (a requeued job while the old one still runs, a resume
// loop started twice) interleave their metrics.jsonl lines and race each other's checkpoint
// renames. Rank 0 holds an flock on RUN_DIR/.lock for the run's life; a second trainer is
// refused at start with the holder's pid, host and start time (written into the file). The
// kernel drops the lock when the holder dies, even by SIGKILL, so a stale file never blocks.
//
//   int fd;
//   if (nm_run_lock_acquire(run_dir, &fd, &err) != 0) ...   // "RUN_DIR is in use by pid ..."
//   ...  nm_run_lock_release(fd);                             // at the end of the run
#pragma once

#include "core/check.h"

// Takes RUN_DIR/.lock (the directory must exist) without waiting; *fd is the open lock file.
int nm_run_lock_acquire(const char *run_dir, int *fd, nm_error *err);
// Releases and closes the lock (fd < 0: nothing).
void nm_run_lock_release(int fd);
