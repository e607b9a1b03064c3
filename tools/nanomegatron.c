// nanomegatron: the command-line front end. Dispatches to one function per subcommand.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "commands.h"

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
    "            --recompute --precision]\n";

char *openblas_get_corename(void);

// Two process-level settings that must be in the environment before the libraries load, so
// they are set here and the program re-executes itself once (only when something changes):
//  - OpenBLAS (0.3.21, DYNAMIC_ARCH) picks its kernels from a list of known CPU models; a
//    virtualised recent Xeon reports a generic model and gets the Prescott (SSE3) kernels,
//    several times slower than the AVX-512 ones the CPU has. OPENBLAS_CORETYPE fixes it.
//  - how long libgomp's idle threads spin before sleeping between parallel regions. A step
//    runs thousands of short regions (every GEMM, every elementwise op), so sleeping at once
//    (OMP_WAIT_POLICY=passive) pays a futex wake-up each time, and spinning long (libgomp's
//    default 300,000 spins) takes the cores from working threads when the machine is shared.
//    configs/small.json, 2 threads, 2 cores (tokens/s): alone, passive ~900, 10,000 spins
//    ~1,050-1,150, 100,000 ~1,150; two runs sharing the cores, each: passive ~620, 10,000
//    ~560, 30,000 ~470, 100,000 ~380. So GOMP_SPINCOUNT=10000: most of the idle-machine gain,
//    -10% when oversubscribed. Users who set OMP_WAIT_POLICY or GOMP_SPINCOUNT keep theirs.
static void fix_runtime_environment(char **argv) {
    int changed = 0;
    if (!getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
        setenv("GOMP_SPINCOUNT", "10000", 1);
        changed = 1;
    }
    const char *core = openblas_get_corename();
    if (!getenv("OPENBLAS_CORETYPE") && core &&
        (!strcasecmp(core, "Prescott") || !strcasecmp(core, "Core2") || !strcasecmp(core, "Nehalem"))) {
        __builtin_cpu_init();
        const char *want = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : NULL;
        if (want) {
            setenv("OPENBLAS_CORETYPE", want, 1);
            changed = 1;
        }
    }
    if (changed) execv("/proc/self/exe", argv);  // on failure carry on as we are
}

int main(int argc, char **argv) {
    fix_runtime_environment(argv);
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    int sub_argc = argc - 2;
    char **sub_argv = argv + 2;
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
