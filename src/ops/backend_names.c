// backend_names.c: the names of the backends this build has ("cuda" only with NM_HAVE_CUDA),
// and the check of a name against them. Apart from registry.c (which maps each name to its
// table) because the training config checks its 'backend' key with it, and the config parser
// is built without any backend (the fuzz targets of tests/fuzz link it with a handful of
// sources).
#include <stdio.h>
#include <string.h>

#include "ops/ops.h"

#ifdef NM_HAVE_CUDA
const char *const nm_ops_backend_names[] = {"cpu", "ref", "cuda", NULL};
#else
const char *const nm_ops_backend_names[] = {"cpu", "ref", NULL};
#endif

int nm_ops_check_backend(const char *name, const char *what, nm_error *err) {
    char known[128] = "";
    size_t n = 0;
    for (int i = 0; nm_ops_backend_names[i]; i++) {
        if (name && strcmp(name, nm_ops_backend_names[i]) == 0) return 0;
        n += (size_t)snprintf(known + n, sizeof known - n, "%s%s", i ? ", " : "", nm_ops_backend_names[i]);
        if (n >= sizeof known) n = sizeof known - 1;
    }
#ifndef NM_HAVE_CUDA
    // the one backend a build may lack: say why, and how to get it
    if (name && strcmp(name, "cuda") == 0)
        return nm_error_set(err, "%s \"%s\" is not a backend (known: %s); this build has no CUDA backend (configure "
                            "with -DNM_CUDA=ON on a machine with the CUDA toolkit)", what, name, known);
#endif
    return nm_error_set(err, "%s \"%s\" is not a backend (known: %s)", what, name ? name : "(null)", known);
}
