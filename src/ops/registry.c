// registry.c: the backends by name, so that the trainer and the tools take theirs from the
// configuration ('backend' key, NM_BACKEND) instead of naming one in code.
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "ops/ops.h"

static const struct {
    const char *name;
    const nm_ops *(*get)(void);
} backends[] = {
    {"cpu", nm_ops_cpu},
    {"ref", nm_ops_ref},
#ifdef NM_HAVE_CUDA
    {"cuda", nm_ops_cuda},  // in the registry whenever built; its setup refuses a machine without a GPU
#endif
};

#define N_BACKENDS ((int)(sizeof backends / sizeof backends[0]))

const nm_ops *nm_ops_by_name(const char *name) {
    // the name list the config parser checks against (backend_names.c) is this table's
    for (int i = 0; i <= N_BACKENDS; i++)
        NM_CHECK(i < N_BACKENDS ? nm_ops_backend_names[i] && !strcmp(nm_ops_backend_names[i], backends[i].name)
                                : !nm_ops_backend_names[i],
                 "nm_ops_backend_names lists the registry's backends in its order");
    for (int i = 0; name && i < N_BACKENDS; i++)
        if (strcmp(name, backends[i].name) == 0) return backends[i].get();
    return NULL;
}

const nm_ops *nm_ops_select(const char *name, nm_error *err) {
    const char *env = getenv("NM_BACKEND");
    const int from_env = env && *env;
    if (from_env) name = env;
    else if (!name) name = "cpu";
    if (nm_ops_check_backend(name, from_env ? "environment variable NM_BACKEND:" : "backend", err) != 0) return NULL;
    return nm_ops_by_name(name);
}

void nm_ops_prepare_process(char **argv) {
    // Only the CPU backend needs any; its settings are harmless where another one runs.
    nm_ops_cpu_prepare_process(argv);
}
