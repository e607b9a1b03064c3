// fileio.c: implementation of fileio.h.
#define _GNU_SOURCE
#include "core/fileio.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int nm_atomic_open(nm_atomic_file *f, const char *path, nm_error *err) {
    memset(f, 0, sizeof(*f));
    size_t n = strlen(path) + 64;
    f->path = nm_strdup(path);
    f->tmp_path = nm_malloc(n);
    snprintf(f->tmp_path, n, "%s.tmp.%ld", path, (long)getpid());
    f->fp = fopen(f->tmp_path, "wb");
    if (!f->fp) {
        int e = errno;
        nm_free(f->path);
        nm_free(f->tmp_path);
        memset(f, 0, sizeof(*f));
        return nm_error_set(err, "%s: cannot create temporary file: %s", path, strerror(e));
    }
    return 0;
}

int nm_fsync_dir(const char *dir, nm_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return nm_error_set(err, "%s: cannot open directory: %s", dir, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    // Some filesystems refuse fsync on directories (EINVAL); the rename is still atomic.
    if (rc != 0 && e != EINVAL) return nm_error_set(err, "%s: fsync failed: %s", dir, strerror(e));
    return 0;
}

int nm_atomic_commit(nm_atomic_file *f, nm_error *err) {
    int rc = 0;
    if (fflush(f->fp) != 0 || fsync(fileno(f->fp)) != 0) {
        rc = nm_error_set(err, "%s: write failed: %s", f->path, strerror(errno));
    }
    if (fclose(f->fp) != 0 && rc == 0) rc = nm_error_set(err, "%s: close failed: %s", f->path, strerror(errno));
    f->fp = NULL;
    if (rc == 0 && rename(f->tmp_path, f->path) != 0) {
        rc = nm_error_set(err, "%s: rename from %s failed: %s", f->path, f->tmp_path, strerror(errno));
    }
    if (rc != 0) {
        unlink(f->tmp_path);
    } else {
        char *copy = nm_strdup(f->path);
        rc = nm_fsync_dir(dirname(copy), err);
        nm_free(copy);
    }
    nm_free(f->path);
    nm_free(f->tmp_path);
    memset(f, 0, sizeof(*f));
    return rc;
}

void nm_atomic_abort(nm_atomic_file *f) {
    if (!f || !f->tmp_path) return;
    if (f->fp) fclose(f->fp);
    unlink(f->tmp_path);
    nm_free(f->path);
    nm_free(f->tmp_path);
    memset(f, 0, sizeof(*f));
}

int nm_fwrite_all(FILE *fp, const void *data, size_t size, const char *path, nm_error *err) {
    if (size && fwrite(data, 1, size, fp) != size) {
        return nm_error_set(err, "%s: write of %zu bytes failed: %s", path, size, strerror(errno));
    }
    return 0;
}

int nm_file_write_atomic(const char *path, const void *data, size_t size, nm_error *err) {
    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err) != 0) return -1;
    if (nm_fwrite_all(f.fp, data, size, path, err) != 0) {
        nm_atomic_abort(&f);
        return -1;
    }
    return nm_atomic_commit(&f, err);
}

// Reads fp to its end into a growing buffer: regular files (whose size is only a hint: it may
// change under us, and /proc files report 0) and streams alike, so `--config <(cat f)`, a
// FIFO or a pipe reads as well as a file does.
static int read_stream(FILE *fp, size_t hint, const char *path, char **data, size_t *size, nm_error *err) {
    size_t cap = hint + 1 > 4096 ? hint + 1 : 4096, n = 0;
    char *buf = nm_malloc(cap);
    for (;;) {
        if (n + 1 >= cap) {
            cap *= 2;
            buf = nm_realloc(buf, cap);
        }
        size_t got = fread(buf + n, 1, cap - 1 - n, fp);
        n += got;
        if (got == 0) break;
    }
    if (ferror(fp)) {
        int e = errno;
        nm_free(buf);
        return nm_error_set(err, "%s: read failed after %zu bytes: %s", path, n, strerror(e));
    }
    buf[n] = 0;
    *data = buf;
    if (size) *size = n;
    return 0;
}

static int read_file(const char *path, const char *expected, char **data, size_t *size, nm_error *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        int e = errno;
        fclose(fp);
        return nm_error_set(err, "%s: cannot stat: %s", path, strerror(e));
    }
    // fopen succeeds on a directory, and its "size" (ftell at the end) is LONG_MAX on some
    // file systems: without this the caller asked for 8 EiB of memory.
    if (S_ISDIR(st.st_mode)) {
        fclose(fp);
        return nm_error_set(err, "%s is a directory; expected %s", path, expected);
    }
    int rc = read_stream(fp, S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size : 0, path, data, size, err);
    fclose(fp);
    return rc;
}

int nm_file_read_all(const char *path, char **data, size_t *size, nm_error *err) {
    return read_file(path, "a file", data, size, err);
}

int nm_file_read_json(const char *path, char **data, size_t *size, nm_error *err) {
    size_t n = 0;
    if (read_file(path, "a JSON file", data, &n, err)) return -1;
    size_t i = 0;
    for (char c; i < n && ((c = (*data)[i]) == ' ' || c == '\t' || c == '\r' || c == '\n');) i++;
    if (i == n) {
        nm_free(*data);
        *data = NULL;
        return nm_error_set(err, "%s is empty; expected a JSON file (was it truncated, or is it the wrong path?)", path);
    }
    if (size) *size = n;
    return 0;
}

int nm_dir_check_new(const char *path, nm_error *err) {
    struct stat st;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT) return 0;
        return nm_error_set(err, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (!S_ISDIR(st.st_mode)) return nm_error_set(err, "%s exists and is not a directory", path);
    DIR *d = opendir(path);
    if (!d) return nm_error_set(err, "%s: cannot list: %s", path, strerror(errno));
    char first[256] = "";
    long n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (n++ == 0) snprintf(first, sizeof(first), "%s", e->d_name);
    }
    closedir(d);
    if (n == 0) return 0;
    if (n == 1) return nm_error_set(err, "%s is not empty (it holds '%s')", path, first);
    return nm_error_set(err, "%s is not empty (it holds '%s' and %ld more)", path, first, n - 1);
}

int nm_mkdir_p(const char *path, nm_error *err) {
    char *p = nm_strdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = 0;
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                int e = errno;
                nm_error_set(err, "%s: cannot create directory: %s", p, strerror(e));
                nm_free(p);
                return -1;
            }
            *s = '/';
        }
    }
    int rc = 0;
    if (mkdir(p, 0755) != 0 && errno != EEXIST) rc = nm_error_set(err, "%s: cannot create directory: %s", p, strerror(errno));
    nm_free(p);
    return rc;
}

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

static uint32_t crc32c_table[256];
static int crc32c_ready;

static uint32_t crc32c_bytes(uint32_t crc, const uint8_t *p, size_t size) {
    if (!crc32c_ready) {  // benign race: every thread computes the same table
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
            crc32c_table[i] = c;
        }
        crc32c_ready = 1;
    }
    for (size_t i = 0; i < size; i++) crc = crc32c_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return crc;
}

uint32_t nm_crc32c(uint32_t crc, const void *data, size_t size) {
    const uint8_t *p = data;
    crc = ~crc;
#if defined(__SSE4_2__)
    // The CRC32 instruction computes exactly this polynomial (Castagnoli), 8 bytes a cycle
    // or so: checkpoints of large models are checksummed at disk speed, not at 0.5 GB/s.
    uint64_t c = crc;
    for (; size >= 8; size -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    crc = (uint32_t)c;
#endif
    return ~crc32c_bytes(crc, p, size);
}
