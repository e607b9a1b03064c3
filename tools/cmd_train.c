// cmd_train.c: `nanomegatron train` and `nanomegatron eval`.
//
//   train --config C --out RUN_DIR [--steps N] [--save-every N] [--seed S] [--set k=v]...
//         [--init-from HF_DIR] [--resume] [--recompute] [--quiet] [--inject-nan STEP]
// --inject-nan STEP[:COUNT] poisons a gradient at COUNT steps from STEP: a test hook for the
// divergence guard.
//   eval  --model DIR --data PREFIX [--seq-len T] [--batch B] [--batches N] [--seed S]
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "args.h"
#include "model_dir.h"
#include "commands.h"
#include "io/hf_dir.h"
#include "nanomegatron.h"
#include "comm/comm.h"

// A training error: the message once, from the rank that hit it (named when there are
// several), then, under MPI, the whole job stops (no rank left waiting in a collective).
static void train_failed(const nm_error *err) {
    int rank, world;
    nm_comm_job_position(&rank, &world);
    // A layout error is found by every rank alike, before any collective: said once, by rank
    // 0, and every rank exits normally instead of a message per rank and MPI_Abort's noise.
    if (world > 1 && strncmp(err->msg, "parallel layout:", 16) == 0) {
        if (rank == 0) fprintf(stderr, "nanomegatron train: %s\n", err->msg);
        return;
    }
    if (world > 1) fprintf(stderr, "\nnanomegatron train: rank %d of %d: %s\n", rank, world, err->msg);
    else fprintf(stderr, "\nnanomegatron train: %s\n", err->msg);
    if (world > 1) nm_comm_abort_job(1);
}

// --inject-nan STEP[:COUNT], the divergence guard's test hook (tests/test_train_guard.sh,
// test_dist_faults.sh), installed as the trainer's before_backward hook: poison one gradient
// of the first block at COUNT consecutive steps from STEP, before the backward adds to it, so
// the NaN is this rank's own, there before any reduction. The reductions carry it to every
// rank's decision (the reduce-scatter into its owner's range, then the gradient norm over the
// world), so all ranks skip the step. NM_TEST_INJECT_NAN_RANK=R: on world rank R only.
typedef struct inject_nan {
    int64_t step, count;
    int here;                   // this rank poisons
} inject_nan;

static int inject_nan_hook(void *ctx, nm_model *model, int64_t step, nm_error *err) {
    const inject_nan *in = ctx;
    (void)err;
    if (!in->here || step < in->step || step >= in->step + in->count) return 0;
    size_t off = nm_model_table(model)->layers[0].input_norm;
    if (off != NM_OFF_NONE) nm_model_grads(model)[off] = NAN;  // the stage holding layer 0
    return 0;
}

// Whether this rank poisons (NM_TEST_INJECT_NAN_RANK), or -1 with err for a bad value.
static int inject_nan_here(nm_error *err) {
    const char *v = getenv("NM_TEST_INJECT_NAN_RANK");
    if (!v || !*v) return 1;
    int rank, world;
    nm_comm_job_position(&rank, &world);
    char *end;
    long r = strtol(v, &end, 10);
    if (*end || r < 0 || r >= world)
        return nm_error_set(err, "NM_TEST_INJECT_NAN_RANK=%s: expected a rank from 0 to %d", v, world - 1);
    return r == rank;
}

static char *concat(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 1;
    char *s = malloc(n);
    if (!s) abort();
    snprintf(s, n, "%s%s", a, b);
    return s;
}

// The --set list, in the order applied: the shorthands first (--steps, --save-every, --seed,
// --init-from), then every --set, so a later --set wins. Heap strings (as many as given).
static char **build_overrides(const nm_args *a, int *n) {
    int n_set;
    const char **sets = nm_args_all(a, "set", &n_set);
    char **o = calloc((size_t)n_set + 5, sizeof(char *));
    if (!o) abort();
    *n = 0;
    const char *v;
    if ((v = nm_args_str(a, "steps", NULL))) o[(*n)++] = concat("steps=", v);
    if ((v = nm_args_str(a, "save-every", NULL))) o[(*n)++] = concat("checkpoint.save_every=", v);
    if ((v = nm_args_str(a, "seed", NULL))) o[(*n)++] = concat("seed=", v);
    if ((v = nm_args_str(a, "init-from", NULL))) {
        // Continue pre-training from a Hugging Face directory instead of a fresh init.
        o[(*n)++] = concat("model=", "null");
        o[(*n)++] = concat("init_from=", v);
    }
    for (int i = 0; i < n_set; i++) o[(*n)++] = concat("", sets[i]);
    free(sets);
    return o;
}

// --- signals: stop at a step boundary with a checkpoint ----------------------------------------
//
// SIGINT (Ctrl-C), SIGTERM (Slurm preemption, scancel, the end of a time limit) and SIGUSR1
// (sbatch --signal=USR1@SECONDS, ahead of the time limit) finish the step under way, write a
// checkpoint of it and exit with NM_EXIT_INTERRUPTED, so that a requeued `--resume` continues
// bit for bit instead of losing everything since the last save_every. A second signal exits
// at once with 128 + its number. The step loop looks at the flag between steps, and the ranks
// agree with an all-reduce (MAX) over the job, so that all of them stop after the same step
// even when only some got the signal.
//
// No handler: the signals are blocked in every thread (from before the first one starts, so
// OpenMP's, oneDNN's and MPI's threads inherit the mask) and one thread takes them with
// sigwait. A handler's signal frame, pushed onto a thread inside oneDNN 2.6's sgemm, corrupted
// the heap ("corrupted size vs. prev_size") in 6 of 15 interrupted tiny runs, even a handler
// that only set a flag; none with OpenBLAS or with the frame on an alternate stack. This way no
// compute thread is ever interrupted, and no system call (MPI, checkpoint writes) sees EINTR.
#define NM_EXIT_INTERRUPTED 75      // EX_TEMPFAIL (sysexits.h): stopped early, run again to continue
static atomic_int stop_signal;      // the first signal's number, 0 until one comes
static atomic_int signal_notice = 1;  // this rank says "finishing this step" (rank 0)
static sigset_t stop_signals;

static const char *signal_name(int sig) {
    return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal";
}

static void *watch_signals(void *unused) {
    (void)unused;
    for (;;) {
        int sig;
        if (sigwait(&stop_signals, &sig) != 0) continue;
        if (atomic_load(&stop_signal)) {
            fprintf(stderr, "\nnanomegatron train: %s: a second signal: exiting at once, without a checkpoint of "
                    "the step under way\n", signal_name(sig));
            _exit(128 + sig);
        }
        atomic_store(&stop_signal, sig);
        if (atomic_load(&signal_notice))
            fprintf(stderr, "\nnanomegatron train: %s: finishing this step, then a checkpoint (send it again to exit "
                    "at once)\n", signal_name(sig));
    }
    return NULL;
}

// Before any other thread exists (OpenMP starts its threads at the first parallel region).
static void watch_stop_signals(void) {
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, watch_signals, NULL) != 0) {
        // Without the watcher the signals keep their default action: they end the run.
        pthread_sigmask(SIG_UNBLOCK, &stop_signals, NULL);
        fprintf(stderr, "nanomegatron train: warning: no signal thread; SIGINT/SIGTERM/SIGUSR1 will stop the run without a checkpoint\n");
        return;
    }
    pthread_detach(th);
}

int nm_cmd_train(int argc, char **argv) {
    static const char *const value_flags[] = {"config", "out", "steps", "save-every", "seed", "set", "inject-nan", "init-from", NULL};
    static const char *const bool_flags[] = {"resume", "quiet", "help", "recompute", "allow-config-change", NULL};
    nm_args a;
    if (nm_args_parse(&a, "train", argc, argv, value_flags, bool_flags) != 0) return 2;
    if (nm_args_has(&a, "help")) {
        printf("usage: nanomegatron train --config C --out RUN_DIR [--steps N] [--save-every N] [--seed S]\n"
               "                          [--set key=value]... [--init-from HF_DIR] [--resume [--allow-config-change]]\n"
               "                          [--recompute] [--quiet]\n"
               "--resume refuses a changed data, split, seq_len, global_batch or tokenizer (the data cursor\n"
               "counts samples of the old stream) unless --allow-config-change says it is meant.\n\ntraining config keys:\n");
        nm_train_config_describe(stdout);
        printf("\nSIGINT, SIGTERM, SIGUSR1: finish the step, write a checkpoint, exit %d (--resume continues it);\n"
               "a second signal exits at once (128 + signal). One trainer per RUN_DIR (RUN_DIR/.lock).\n",
               NM_EXIT_INTERRUPTED);
        return 0;
    }
    const char *config = nm_args_str(&a, "config", NULL), *run_dir = nm_args_str(&a, "out", NULL);
    if (!config || !run_dir) {
        fprintf(stderr, "train: --config and --out are required (see train --help)\n");
        return 2;
    }
    // The shorthands checked here, so a bad value is named as typed (--steps nan), not as the
    // --set it becomes; the bounds are the training config's (train --help).
    int64_t ignored;
    if (nm_args_i64_in(&a, "steps", 1, 1, (int64_t)1 << 53, &ignored) ||
        nm_args_i64_in(&a, "save-every", 0, 0, (int64_t)1 << 53, &ignored) ||
        nm_args_i64_in(&a, "seed", 0, 0, (int64_t)1 << 53, &ignored))
        return 2;
    // --inject-nan STEP[:COUNT]: poison a gradient at COUNT consecutive steps from STEP.
    long long inject = 0, inject_count = 1;
    const char *inj = nm_args_str(&a, "inject-nan", NULL);
    if (inj) {
        char *end;
        inject = strtoll(inj, &end, 10);
        if (*end == ':') inject_count = strtoll(end + 1, &end, 10);
        if (*end || inject < 1 || inject_count < 1) {
            fprintf(stderr, "train: --inject-nan expects STEP or STEP:COUNT (positive integers), got '%s'\n", inj);
            return 2;
        }
    }

    nm_error err = {{0}};
    nm_train_config cfg;
    int n;
    char **overrides = build_overrides(&a, &n);
    int bad = nm_train_config_load(&cfg, config, (const char *const *)overrides, n, &err);
    for (int i = 0; i < n; i++) free(overrides[i]);
    free(overrides);
    if (bad) {
        fprintf(stderr, "nanomegatron train: %s\n", err.msg);
        nm_train_config_free(&cfg);
        return 1;
    }
    nm_trainer_options opts = {.run_dir = run_dir, .resume = nm_args_has(&a, "resume"),
                               .quiet = nm_args_has(&a, "quiet"), .recompute = nm_args_has(&a, "recompute"),
                               .allow_config_change = nm_args_has(&a, "allow-config-change")};
    inject_nan nan_hook = {.step = inject, .count = inject_count};
    if (inject > 0) {
        nan_hook.here = inject_nan_here(&err);
        if (nan_hook.here < 0) {
            fprintf(stderr, "nanomegatron train: %s\n", err.msg);
            nm_train_config_free(&cfg);
            return 1;
        }
        opts.before_backward = inject_nan_hook;
        opts.hook_ctx = &nan_hook;
    }
    nm_trainer *t;
    int rc = 0;
    // Watched from before start-up: a signal during it stops the run after its first step.
    watch_stop_signals();
    if (nm_trainer_create(&t, &cfg, &opts, &err) != 0) {
        train_failed(&err);
        nm_train_config_free(&cfg);
        return 1;
    }
    int rank, world;
    nm_comm_job_position(&rank, &world);
    atomic_store(&signal_notice, rank == 0);
    nm_step_metrics m = {0};
    int s, stop = 0;
    int64_t last_saved = -1;
    while ((s = nm_trainer_step(t, &m, &err)) > 0) {
        if (cfg.checkpoint.save_every > 0 && m.step % cfg.checkpoint.save_every == 0) last_saved = m.step;
        if (nm_trainer_agree_stop(t, atomic_load(&stop_signal), &stop, &err) != 0) s = -1;
        if (s < 0 || stop) break;
    }
    if (stop && nm_trainer_step_count(t) >= cfg.steps) stop = 0;  // it came after the last step: done
    if (s < 0) {
        train_failed(&err);
        rc = 1;
    } else {
        if (nm_trainer_step_count(t) != last_saved && nm_trainer_save(t, &err) != 0) {
            train_failed(&err);
            rc = 1;
        }
        if (rc == 0 && nm_trainer_finish(t, &err) != 0) {
            train_failed(&err);
            rc = 1;
        }
        if (rc == 0 && stop && rank == 0) {
            // Even with --quiet: whoever requeues the job needs to know where it stands.
            fprintf(stderr, "nanomegatron train: interrupted by %s at step %lld: saved %s/step_%06lld; continue with --resume\n",
                    signal_name(stop), (long long)nm_trainer_step_count(t), run_dir, (long long)nm_trainer_step_count(t));
        }
        if (rc == 0 && stop) rc = NM_EXIT_INTERRUPTED;
        if (rc == 0 && !opts.quiet && rank == 0) {
            printf("done: %lld steps | metrics %s/metrics.jsonl | loss curve %s/loss.svg | tensorboard --logdir %s\n",
                   (long long)nm_trainer_step_count(t), run_dir, run_dir, run_dir);
        }
    }
    nm_trainer_destroy(t);
    nm_train_config_free(&cfg);
    return rc;
}

int nm_cmd_eval(int argc, char **argv) {
    static const char *const value_flags[] = {"model", "data", "seq-len", "batch", "batches", "seed", NULL};
    nm_args a;
    if (nm_args_parse(&a, "eval", argc, argv, value_flags, NULL) != 0) return 2;
    const char *dir = nm_args_str(&a, "model", NULL), *prefix = nm_args_str(&a, "data", NULL);
    int64_t seq_len, B, batches, seed;
    if (!dir || !prefix) {
        fprintf(stderr, "eval: --model and --data are required\n");
        return 2;
    }
    // The training config's bounds for seq_len and micro_batch; the shuffle seed is 32-bit.
    if (nm_args_i64_in(&a, "seq-len", 256, 1, 1 << 24, &seq_len) || nm_args_i64_in(&a, "batch", 8, 1, 1 << 24, &B) ||
        nm_args_i64_in(&a, "batches", 0, 0, NM_ARGS_SEED_MAX, &batches) ||
        nm_args_i64_in(&a, "seed", 1234, 0, 0xffffffffLL, &seed)) return 2;
    nm_error err = {{0}};
    nm_model_config cfg = {0};
    const nm_ops *ops = NULL;
    nm_model *m = NULL;
    nm_loader *l = NULL;
    int32_t *tokens = NULL;
    int rc = 1;
    char model_dir[4400];
    if (nm_resolve_model_dir(dir, -1, model_dir, sizeof model_dir, NULL, 0, &err) != 0) goto done;
    dir = model_dir;
    if (nm_hf_dir_load_config(dir, &cfg, &err) != 0) goto done;
    if (seq_len > cfg.max_pos) {
        nm_error_set(&err, "--seq-len %lld is longer than the model's max_position_embeddings %lld (%s/config.json): "
                     "give --seq-len <= %lld", (long long)seq_len, (long long)cfg.max_pos, dir, (long long)cfg.max_pos);
        goto done;
    }
    // NM_BACKEND, else the CPU backend; destroyed after the model
    if (nm_backend_select(&ops, NULL, &err) != 0 ||
        nm_model_create(&m, &cfg, ops, B, seq_len + 1, &err) != 0) goto done;
    if (nm_hf_dir_load_model(dir, nm_model_table(m), &cfg, 0, nm_model_params(m), &err) != 0) goto done;
    nm_data_spec spec;
    nm_data_spec_default(&spec);
    const double one = 1.0;
    spec.n_sources = 1;
    spec.prefixes = &prefix;
    spec.weights = &one;
    spec.seed = (uint32_t)seed;
    spec.seq_len = seq_len;
    spec.split[0] = 1.0;
    spec.split[1] = spec.split[2] = 0.0;
    if (nm_loader_create(&l, &spec, NM_SPLIT_TRAIN, 0, 1, &err) != 0) goto done;
    // Default: one pass over the dataset's windows (at most 1000 batches).
    int64_t windows = (nm_loader_tokens(l) - 1) / seq_len;
    if (batches == 0) batches = windows / B > 0 ? (windows / B < 1000 ? windows / B : 1000) : 1;
    tokens = nm_malloc((size_t)(B * (seq_len + 1)) * sizeof(int32_t));
    nm_loss_options opt = {.mtp_weight = 0.0f, .aux_weight = 0.0f, .grad_scale = 1.0f, .inference = 1};
    double sum = 0.0;
    for (int64_t i = 0; i < batches; i++) {
        nm_loss_terms lt;
        if (nm_loader_next_batch(l, tokens, B, &err) != 0) goto done;
        if (nm_model_forward(m, tokens, B, seq_len + 1, &opt, &lt, NULL, &err) != 0) goto done;
        sum += lt.ce;
    }
    double loss = sum / (double)batches;
    printf("eval: %s on %s: %lld batches x %lld x %lld tokens | loss %.4f | perplexity %.3f\n", dir, prefix,
           (long long)batches, (long long)B, (long long)seq_len, loss, exp(loss));
    printf("{\"loss\": %.9g, \"perplexity\": %.9g, \"tokens\": %lld}\n", loss, exp(loss),
           (long long)(batches * B * seq_len));
    rc = 0;
done:
    if (rc != 0) fprintf(stderr, "nanomegatron eval: %s\n", err.msg);
    nm_free(tokens);
    nm_loader_destroy(l);
    nm_model_destroy(m);
    nm_backend_destroy(ops);
    nm_model_config_free(&cfg);
    return rc;
}
