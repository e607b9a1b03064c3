// test_backend.h: the test programs' default backend instances. Library code has no default
// instance (ops.h: whoever creates one destroys it); a test that runs its helpers on "the CPU
// backend" takes test_backend("cpu") instead of threading an instance through every helper,
// and that default is explicit here: made on first use, destroyed at exit.
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops.h"

static struct {
    const char *name;
    const nm_ops *be;
} test_backend_slots[4];

static void test_backends_destroy(void) {
    for (int i = 0; i < 4; i++) {
        nm_backend_destroy(test_backend_slots[i].be);
        test_backend_slots[i].be = NULL;
        test_backend_slots[i].name = NULL;
    }
}

// The program's one instance of backend `name` ("cpu", "ref"); exits with the reason when it
// cannot be created.
static inline const nm_ops *test_backend(const char *name) {
    int i = 0;
    for (; i < 4 && test_backend_slots[i].name; i++)
        if (strcmp(test_backend_slots[i].name, name) == 0) return test_backend_slots[i].be;
    nm_error err;
    if (i == 4 || nm_backend_create(&test_backend_slots[i].be, name, &err) != 0) {
        fprintf(stderr, "test_backend(%s): %s\n", name, i == 4 ? "more than 4 backends" : err.msg);
        exit(1);
    }
    if (i == 0) atexit(test_backends_destroy);
    test_backend_slots[i].name = test_backend_slots[i].be->name;
    return test_backend_slots[i].be;
}
