// cmd_model.c: placeholder until the owning issue lands; every command here fails loudly.
#include <stdio.h>

#include "commands.h"

int nm_cmd_init(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "nanomegatron: this command is not implemented yet\n");
    return 2;
}

int nm_cmd_inspect_model(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "nanomegatron: this command is not implemented yet\n");
    return 2;
}
