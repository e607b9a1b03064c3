// npy.c: .npy files, written atomically and read through mmap (see npy.h).
#define _GNU_SOURCE
#include "io/npy.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

static const char MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

size_t nm_npy_elem_size(const char *descr) {
    if (!strcmp(descr, "<i4") || !strcmp(descr, "<u4")) return 4;
    if (!strcmp(descr, "<i8")) return 8;
    if (!strcmp(descr, "<i2")) return 2;
    return 0;
}

int nm_npy_write(const char *path, const char *descr, const int64_t *shape, int ndim, const void *data,
                 nm_error *err) {
    NM_CHECK((ndim == 1 || ndim == 2) && nm_npy_elem_size(descr) > 0, "npy: ndim %d descr %s", ndim, descr);
    char dict[256];
    int len;
    if (ndim == 1)
        len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%" PRId64 ",), }", descr,
                       shape[0]);
    else
        len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%" PRId64 ", %" PRId64
                       "), }", descr, shape[0], shape[1]);
    // magic (6) + version (2) + length (2) + dict + spaces + '\n', a multiple of 64
    size_t total = (size_t)(10 + len + 1 + 63) / 64 * 64;
    size_t hlen = total - 10;
    char header[320];
    memcpy(header, MAGIC, 6);
    header[6] = 1;
    header[7] = 0;
    header[8] = (char)(hlen & 0xff);
    header[9] = (char)(hlen >> 8);
    memcpy(header + 10, dict, (size_t)len);
    memset(header + 10 + len, ' ', hlen - (size_t)len - 1);
    header[total - 1] = '\n';
    size_t bytes = nm_npy_elem_size(descr) * (size_t)shape[0] * (size_t)(ndim == 2 ? shape[1] : 1);
    nm_atomic_file f;
    if (nm_atomic_open(&f, path, err) != 0) return -1;
    if (nm_fwrite_all(f.fp, header, total, path, err) != 0 || nm_fwrite_all(f.fp, data, bytes, path, err) != 0) {
        nm_atomic_abort(&f);
        return -1;
    }
    return nm_atomic_commit(&f, err);
}

// The value after 'key': in the header dict (a string in quotes, a word, or a tuple).
static const char *dict_value(const char *dict, const char *key) {
    const char *p = strstr(dict, key);
    if (!p) return NULL;
    p += strlen(key);
    while (*p == ' ' || *p == ':') p++;
    return p;
}

static int parse_header(nm_npy *m, const char *dict, const char *path, nm_error *err) {
    const char *d = dict_value(dict, "'descr'"), *f = dict_value(dict, "'fortran_order'"),
               *s = dict_value(dict, "'shape'");
    if (!d || !f || !s || *d != '\'' || *s != '(')
        return nm_error_set(err, "%s: .npy header without descr, fortran_order and shape: %.120s", path, dict);
    const char *e = strchr(d + 1, '\'');
    if (!e || e - d - 1 >= (ptrdiff_t)sizeof(m->descr))
        return nm_error_set(err, "%s: .npy descr unreadable: %.120s", path, dict);
    memcpy(m->descr, d + 1, (size_t)(e - d - 1));
    m->descr[e - d - 1] = 0;
    if (!nm_npy_elem_size(m->descr))
        return nm_error_set(err, "%s: .npy dtype '%s' (expected <i2, <i4, <u4 or <i8)", path, m->descr);
    if (strncmp(f, "False", 5) != 0) return nm_error_set(err, "%s: .npy in Fortran order (expected C order)", path);
    m->ndim = 0;
    const char *p = s + 1;
    while (*p && *p != ')') {
        while (*p == ' ' || *p == ',') p++;
        if (*p == ')') break;
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 0 || m->ndim == 2)
            return nm_error_set(err, "%s: .npy shape unreadable or not 1-D/2-D: %.120s", path, dict);
        m->shape[m->ndim++] = v;
        p = end;
    }
    if (m->ndim == 0) return nm_error_set(err, "%s: .npy shape () (expected 1 or 2 dimensions)", path);
    return 0;
}

int nm_npy_map(nm_npy *m, const char *path, nm_error *err) {
    memset(m, 0, sizeof(*m));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return nm_error_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return nm_error_set(err, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    if (size < 10) {
        close(fd);
        return nm_error_set(err, "%s: %zu bytes, too short for a .npy header", path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return nm_error_set(err, "%s: cannot map: %s", path, strerror(errno));
    const unsigned char *b = map;
    int rc = 0;
    size_t hstart = 10, hlen = 0;
    if (memcmp(b, MAGIC, 6) != 0) rc = nm_error_set(err, "%s: not a .npy file (no \\x93NUMPY magic)", path);
    else if (b[6] == 1) hlen = (size_t)b[8] | (size_t)b[9] << 8;
    else if (b[6] == 2 || b[6] == 3) {
        hstart = 12;
        hlen = size >= 12 ? ((size_t)b[8] | (size_t)b[9] << 8 | (size_t)b[10] << 16 | (size_t)b[11] << 24) : SIZE_MAX;
    } else rc = nm_error_set(err, "%s: .npy version %d.%d (expected 1.0 or 2.0)", path, b[6], b[7]);
    if (rc == 0 && (hlen > 65536 || hstart + hlen > size))
        rc = nm_error_set(err, "%s: .npy header of %zu bytes runs past the file's %zu", path, hlen, size);
    if (rc == 0) {
        char *dict = nm_malloc(hlen + 1);
        memcpy(dict, b + hstart, hlen);
        dict[hlen] = 0;
        rc = parse_header(m, dict, path, err);
        nm_free(dict);
    }
    if (rc == 0) {
        size_t want = nm_npy_elem_size(m->descr) * (size_t)m->shape[0] * (size_t)(m->ndim == 2 ? m->shape[1] : 1);
        if (size != hstart + hlen + want)
            rc = nm_error_set(err, "%s: %zu bytes, expected %zu (header %zu + data %zu): truncated or extended", path,
                              size, hstart + hlen + want, hstart + hlen, want);
    }
    if (rc != 0) {
        munmap(map, size);
        memset(m, 0, sizeof(*m));
        return -1;
    }
    m->map = map;
    m->map_size = size;
    m->data = b + hstart + hlen;
    return 0;
}

void nm_npy_unmap(nm_npy *m) {
    if (m->map) munmap(m->map, m->map_size);
    memset(m, 0, sizeof(*m));
}
