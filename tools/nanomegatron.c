// nanomegatron: the command-line front end. Dispatches to one function per subcommand.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "commands.h"
#include "ops/ops.h"

static const char *usage =
    "usage: nanomegatron <command> [flags]\n"
    "\n"
    "model\n"
    "  init      --config C.json --out DIR [--seed S] [--dtype fp32|bf16]\n"
    "  forward   --model DIR|RUN_DIR --tokens T.bin --batch B [--logits OUT] [--grads G.safetensors]\n"
    "            [--mtp-weight W] [--aux-weight A]\n"
    "  inspect   --model DIR|RUN_DIR | --config C.json      parameters, active per token, FLOPs\n"
    "data\n"
    "  prepare   --input FILE... --tokenizer tokenizer.json|bytes --out PREFIX [--json-key text]\n"
    "            [--append-eod] [--workers N]   |   --synthetic N_TOKENS --out PREFIX [--seed S]\n"
    "  merge     --input PREFIX|DIR... --out PREFIX      datasets concatenated (Megatron's merge_datasets.py)\n"
    "  inspect   --data PREFIX [--doc N] [--tokenizer T] [--samples N --seq-len L --seed S ...]\n"
    "  tokenizer train|encode|decode ...\n"
    "training\n"
    "  train     --config C --out RUN_DIR [--steps N] [--save-every N] [--seed S] [--set k=v]...\n"
    "            [--init-from HF_DIR] [--resume] [--recompute] [--quiet]   (train --help: config keys)\n"
    "  eval      --model DIR|RUN_DIR --data PREFIX [--seq-len T] [--batch B] [--batches N] [--seed S]\n"
    "  sample    --model DIR|RUN_DIR --prompt TEXT [--tokens N] [--temperature T] [--top-p P] [--seed S]\n"
    "  export    --model DIR|RUN_DIR [--step N] --out OUT --format hf|gguf [--dtype fp32|bf16|f16|q8_0]\n"
    "            [--tokenizer T] [--max-shard-size 5GB]\n"
    "  plan      --config MODEL.json|--model DIR --world N [--tp --pp --ep --seq-len --micro-batch --global-batch\n"
    "            --recompute --recompute-modules --precision --pipeline-layout --virtual-pipeline-size --flops --bw-intra --bw-inter ...]\n"
    "\n"
    "<command> --help: that command's lines above; docs/cli.md has every flag.\n";

// `<command> --help` for the commands without a help of their own (train and tokenizer
// have theirs): the command's lines of the usage above, on stdout, exit 0. 1 when printed.
static int command_help(const char *cmd, int argc, char **argv) {
    int asked = 0;
    for (int i = 0; i < argc; i++) asked |= !strcmp(argv[i], "--help");  // (not -h: a value such as a prompt may be "-h")
    if (!asked || !strcmp(cmd, "train") || !strcmp(cmd, "tokenizer")) return 0;
    size_t n = strlen(cmd);
    int printed = 0, in_cmd = 0;
    for (const char *line = usage; *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        // a command's first line is "  <cmd>   ...", its continuations are indented deeper
        if (len > 2 + n && !strncmp(line, "  ", 2) && !strncmp(line + 2, cmd, n) && line[2 + n] == ' ') in_cmd = 1;
        else if (!(len > 12 && !strncmp(line, "            ", 12))) in_cmd = 0;
        if (in_cmd) {
            printf("%.*s\n", (int)len, line);
            printed = 1;
        }
        line += len + (end != NULL);
    }
    if (printed) printf("(docs/cli.md has every flag of every command)\n");
    return printed;
}

int main(int argc, char **argv) {
    // the backends' process settings (OpenBLAS core type, OpenMP spin count) before any work
    nm_ops_prepare_process(argv);
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    int sub_argc = argc - 2;
    char **sub_argv = argv + 2;
    if (command_help(cmd, sub_argc, sub_argv)) return 0;
    if (!strcmp(cmd, "init")) return nm_cmd_init(sub_argc, sub_argv);
    if (!strcmp(cmd, "forward")) return nm_cmd_forward(sub_argc, sub_argv);
    if (!strcmp(cmd, "inspect")) {
        for (int i = 0; i < sub_argc; i++) {
            if (!strncmp(sub_argv[i], "--data", 6)) return nm_cmd_inspect_data(sub_argc, sub_argv);
        }
        return nm_cmd_inspect_model(sub_argc, sub_argv);
    }
    if (!strcmp(cmd, "prepare")) return nm_cmd_prepare(sub_argc, sub_argv);
    if (!strcmp(cmd, "merge")) return nm_cmd_merge(sub_argc, sub_argv);
    if (!strcmp(cmd, "tokenizer")) return nm_cmd_tokenizer(sub_argc, sub_argv);
    if (!strcmp(cmd, "train")) return nm_cmd_train(sub_argc, sub_argv);
    if (!strcmp(cmd, "eval")) return nm_cmd_eval(sub_argc, sub_argv);
    if (!strcmp(cmd, "sample")) return nm_cmd_sample(sub_argc, sub_argv);
    if (!strcmp(cmd, "export")) return nm_cmd_export(sub_argc, sub_argv);
    if (!strcmp(cmd, "plan")) return nm_cmd_plan(sub_argc, sub_argv);
    fprintf(stderr, "nanomegatron: unknown command '%s'\n\n%s", cmd, usage);
    return 2;
}
