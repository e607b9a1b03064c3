// registry.c: the backends by name, so that the trainer and the tools take theirs from the
// configuration ('backend' key, NM_BACKEND) instead of naming one in code, and their instances:
// a copy of the backend's table holding the backend's own state (ctx), so that two instances
// in one process (two models, a test's cpu against ref) share none of it.
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

// The table of the backend called name, or NULL for a name that is none.
static const nm_ops *table_by_name(const char *name) {
    // the name list the config parser checks against (backend_names.c) is this table's
    for (int i = 0; i <= N_BACKENDS; i++)
        NM_CHECK(i < N_BACKENDS ? nm_ops_backend_names[i] && !strcmp(nm_ops_backend_names[i], backends[i].name)
                                : !nm_ops_backend_names[i],
                 "nm_ops_backend_names lists the registry's backends in its order");
    for (int i = 0; name && i < N_BACKENDS; i++)
        if (strcmp(name, backends[i].name) == 0) return backends[i].get();
    return NULL;
}

int nm_backend_create(const nm_ops **out, const char *name, nm_error *err) {
    *out = NULL;
    if (nm_ops_check_backend(name, "backend", err) != 0) return -1;
    const nm_ops *table = table_by_name(name);
    NM_CHECK(table && table->ctx == NULL && table->name && strcmp(table->name, name) == 0,
             "backend %s: its table names it and holds no state", name);
    nm_ops *be = nm_malloc(sizeof *be);
    *be = *table;
    if (be->ctx_create && be->ctx_create(&be->ctx, err) != 0) {
        nm_free(be);
        return -1;
    }
    *out = be;
    return 0;
}

int nm_backend_select(const nm_ops **out, const char *name, nm_error *err) {
    *out = NULL;
    const char *env = getenv("NM_BACKEND");
    const int from_env = env && *env;
    if (from_env) name = env;
    else if (!name) name = "cpu";
    if (nm_ops_check_backend(name, from_env ? "environment variable NM_BACKEND:" : "backend", err) != 0) return -1;
    return nm_backend_create(out, name, err);
}

void nm_backend_destroy(const nm_ops *be) {
    if (!be) return;
    if (be->ctx_destroy) be->ctx_destroy(be->ctx);
    nm_free((nm_ops *)be);  // the instance is const to its users, owned here
}

void nm_ops_prepare_process(char **argv) {
    // Only the CPU backend needs any; its settings are harmless where another one runs.
    nm_ops_cpu_prepare_process(argv);
}
