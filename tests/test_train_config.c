// test_train_config.c: the training config: the shipped configs, defaults, the path rule,
// --set overrides, every class of error message, and the JSON round trip.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "train/train_config.h"

#include "test_util.h"

static int parse(nm_train_config *c, const char *json, const char *const *ov, int n, nm_error *err) {
    memset(err, 0, sizeof(*err));
    return nm_train_config_parse(c, json, "cfgdir/t.json", "cfgdir", ov, n, err);
}

// Parsing must fail and the message must contain every one of the NULL-terminated needles.
static void expect_error(const char *json, const char *const *ov, int n, const char *const *needles, int line) {
    nm_train_config c;
    nm_error err;
    int rc = parse(&c, json, ov, n, &err);
    int ok = rc != 0;
    for (int i = 0; ok && needles[i]; i++) ok = strstr(err.msg, needles[i]) != NULL;
    if (!ok) {
        fprintf(stderr, "FAIL line %d: rc %d, message \"%s\" lacks", line, rc, err.msg);
        for (int i = 0; needles[i]; i++) fprintf(stderr, " [%s]", needles[i]);
        fputc('\n', stderr);
        failures++;
    }
    EXPECT(c.model == NULL && c.tokenizer == NULL && c.source_path == NULL, "not freed after an error (line %d)", line);
    nm_train_config_free(&c);  // still safe
}
#define ERR(json, ...) expect_error((json), NULL, 0, (const char *const[]){__VA_ARGS__, NULL}, __LINE__)
#define ERR_SET(json, ov, ...)                                                                              \
    expect_error((json), (const char *const[]){ov}, 1, (const char *const[]){__VA_ARGS__, NULL}, __LINE__)

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

// --- the shipped configs ---------------------------------------------------------------------------

static void test_shipped(void) {
    const char *root = getenv("NM_ROOT");
    if (!root) {
        fprintf(stderr, "NM_ROOT not set: shipped configs not checked\n");
        return;
    }
    char path[1024];
    nm_train_config c;
    nm_error err;
    snprintf(path, sizeof(path), "%s/configs/tiny-train.json", root);
    EXPECT(nm_train_config_load(&c, path, NULL, 0, &err) == 0, "%s", err.msg);
    if (c.source_path) {
        EXPECT(c.model && ends_with(c.model, "configs/tiny.json") && access(c.model, R_OK) == 0,
               "model resolves next to the train config: %s", c.model ? c.model : "(null)");
        EXPECT(!c.init_from && !strcmp(c.tokenizer, "bytes"), "tokenizer %s", c.tokenizer);
        EXPECT(c.data_synthetic == 1 && c.n_data_paths == 0, "synthetic");
        EXPECT(c.seq_len == 128 && c.micro_batch == 8 && c.global_batch == 16 && c.accum_steps == 2, "batch");
        EXPECT(c.steps == 400 && c.precision == NM_PRECISION_FP32, "steps/precision");
        EXPECT(c.optimizer.lr == 3e-3 && c.optimizer.min_lr == 3e-4, "lr %g %g", c.optimizer.lr, c.optimizer.min_lr);
        EXPECT(c.schedule.type == NM_LR_COSINE && c.schedule.warmup_steps == 30, "schedule");
        EXPECT(c.log.log_every == 10 && c.log.eval_every == 100 && c.checkpoint.save_every == 100, "log/ckpt");
        EXPECT(fabs(c.data_split_frac[0] - 0.99) < 1e-15 && fabs(c.data_split_frac[1] - 0.01) < 1e-15 &&
                   c.data_split_frac[2] == 0.0, "split");
        nm_lr_schedule s;
        nm_train_config_lr_schedule(&c, &s);
        EXPECT(fabs(nm_lr_at(&s, 15) - 1.5e-3) < 1e-15 && fabs(nm_lr_at(&s, 30) - 3e-3) < 1e-15 &&
                   fabs(nm_lr_at(&s, 400) - 3e-4) < 1e-15, "lr schedule from config");
        int64_t acc = 0;
        EXPECT(nm_train_config_accum_steps(&c, 2, &acc, &err) == 0 && acc == 1, "dp 2: accum %lld", (long long)acc);
        EXPECT(nm_train_config_accum_steps(&c, 4, &acc, &err) != 0 && strstr(err.msg, "16") && strstr(err.msg, "8 x 4"),
               "dp 4 must fail naming the numbers: %s", err.msg);
        nm_adamw_config a;
        nm_train_config_adamw(&c, &a);
        EXPECT(a.beta1 == 0.9 && a.beta2 == 0.95 && a.eps == 1e-8 && a.weight_decay == 0.1, "adamw config");
    }
    nm_train_config_free(&c);

    snprintf(path, sizeof(path), "%s/configs/small-train.json", root);
    EXPECT(nm_train_config_load(&c, path, NULL, 0, &err) == 0, "%s", err.msg);
    if (c.source_path) {
        EXPECT(c.model && ends_with(c.model, "configs/small.json") && access(c.model, R_OK) == 0, "small model path");
        EXPECT(c.seq_len == 256 && c.global_batch == 16, "small batch");
        EXPECT(c.schedule.type == NM_LR_WSD_COSINE, "small schedule");
    }
    nm_train_config_free(&c);

    // Overrides on load (steps below the warm-up length is allowed for smoke runs); a missing
    // file names its path.
    const char *ov[] = {"steps=7", "optimizer.lr=1e-2", "precision=bf16"};
    snprintf(path, sizeof(path), "%s/configs/tiny-train.json", root);
    EXPECT(nm_train_config_load(&c, path, ov, 3, &err) == 0, "%s", err.msg);
    EXPECT(c.steps == 7 && c.optimizer.lr == 1e-2 && c.precision == NM_PRECISION_BF16, "overrides on load");
    nm_train_config_free(&c);
    EXPECT(nm_train_config_load(&c, "no/such/train.json", NULL, 0, &err) != 0 && strstr(err.msg, "no/such/train.json"),
           "missing file: %s", err.msg);
}

// --- defaults and paths ----------------------------------------------------------------------------

static void test_defaults_and_paths(void) {
    nm_train_config c;
    nm_error err;
    EXPECT(parse(&c, "{\"model\": \"m.json\"}", NULL, 0, &err) == 0, "%s", err.msg);
    EXPECT(!strcmp(c.model, "cfgdir/m.json"), "relative to the config's directory: %s", c.model);
    EXPECT(c.data_synthetic == 1, "no paths -> synthetic");
    EXPECT(c.global_batch == c.micro_batch && c.accum_steps == 1, "global_batch defaults to micro_batch");
    EXPECT(c.optimizer.lr == 3e-4 && c.optimizer.beta2 == 0.95 && c.optimizer.weight_decay == 0.1 &&
               c.optimizer.clip_grad == 1.0, "optimizer defaults");
    EXPECT(c.balance.bias_update_speed == 0.001 && c.balance.aux_weight == 1e-4, "balance defaults");
    EXPECT(c.mtp.weight == 0.3 && c.mtp.weight_after == 0.1 && c.mtp.switch_step == 0, "mtp defaults");
    EXPECT(!strcmp(c.tokenizer, "bytes") && c.seed == 1234, "tokenizer/seed defaults");
    nm_train_config_free(&c);
    nm_train_config_free(&c);  // idempotent

    // Lexical normalisation, absolute paths, data prefixes, "bytes" is not a path.
    const char *j = "{\"model\": null, \"init_from\": \"./a/../../hf\", \"tokenizer\": \"/abs/tok.json\","
                    " \"data\": {\"paths\": [{\"prefix\": \"d/x\", \"weight\": 3}, {\"prefix\": \"/d/y\"}],"
                    " \"split\": \"949,50,1\"}}";
    EXPECT(parse(&c, j, NULL, 0, &err) == 0, "%s", err.msg);
    if (c.source_path) {
        EXPECT(!c.model && !strcmp(c.init_from, "hf"), "init_from %s", c.init_from);
        EXPECT(!strcmp(c.tokenizer, "/abs/tok.json"), "absolute kept: %s", c.tokenizer);
        EXPECT(c.data_synthetic == 0 && c.n_data_paths == 2, "paths given -> not synthetic");
        EXPECT(!strcmp(c.data_paths[0].prefix, "cfgdir/d/x") && c.data_paths[0].weight == 3.0, "prefix 0");
        EXPECT(!strcmp(c.data_paths[1].prefix, "/d/y") && c.data_paths[1].weight == 1.0, "prefix 1, default weight");
        EXPECT(fabs(c.data_split_frac[0] - 0.949) < 1e-15 && fabs(c.data_split_frac[2] - 0.001) < 1e-15, "split 3");
    }
    nm_train_config_free(&c);
}

// --- overrides -------------------------------------------------------------------------------------

static void test_overrides(void) {
    nm_train_config c;
    nm_error err;
    const char *base = "{\"model\": \"m.json\", \"optimizer\": {\"lr\": 0.001}}";
    const char *ov[] = {
        "optimizer.lr=2e-3", "optimizer.lr=5e-3",  // later wins
        "steps=42", "schedule.type=wsd", "schedule.decay_shape=1-sqrt", "data.synthetic=false",
        "data.paths=[{\"prefix\": \"here/x\", \"weight\": 0.5}]", "model=other.json", "tokenizer=bytes",
        "data.split=98,2", "log.eval_every=0", "seed=9007199254740992",
    };
    EXPECT(parse(&c, base, ov, 12, &err) == 0, "%s", err.msg);
    if (c.source_path) {
        EXPECT(c.optimizer.lr == 5e-3 && c.steps == 42, "lr %g steps %lld", c.optimizer.lr, (long long)c.steps);
        EXPECT(c.schedule.type == NM_LR_WSD && c.schedule.decay_shape == NM_WSD_SQRT, "enums");
        EXPECT(!c.data_synthetic && c.n_data_paths == 1 && c.data_paths[0].weight == 0.5, "data override");
        // --set paths are relative to the current directory, not the config's.
        EXPECT(!strcmp(c.data_paths[0].prefix, "here/x"), "prefix %s", c.data_paths[0].prefix);
        EXPECT(!strcmp(c.model, "other.json"), "model %s", c.model);
        EXPECT(c.seed == 9007199254740992LL, "largest exact seed");
    }
    nm_train_config_free(&c);

    const char *ov2[] = {"model=null", "init_from=ckpt/hf"};
    EXPECT(parse(&c, base, ov2, 2, &err) == 0, "%s", err.msg);
    EXPECT(c.source_path && !c.model && !strcmp(c.init_from, "ckpt/hf"), "switch to init_from");
    nm_train_config_free(&c);
}

// --- errors ----------------------------------------------------------------------------------------

static void test_errors(void) {
    const char *m = "\"model\": \"m.json\"";
    char j[512];
#define J(...) (snprintf(j, sizeof(j), __VA_ARGS__), j)
    // Unknown keys, with suggestions, naming the file.
    ERR(J("{%s, \"sed_len\": 5}", m), "cfgdir/t.json", "unknown key 'sed_len'", "did you mean 'seq_len'");
    ERR(J("{%s, \"optimizer\": {\"lrr\": 1}}", m), "cfgdir/t.json", "'optimizer.lrr'", "'optimizer.lr'");
    ERR(J("{%s, \"lr\": 1}", m), "unknown key 'lr'", "did you mean 'optimizer.lr'");
    ERR(J("{%s, \"optimizer.lr\": 1}", m), "unknown key 'optimizer.lr'");  // only through the section
    ERR(J("{%s, \"zzzzzzzzzz\": 1}", m), "unknown key 'zzzzzzzzzz'");
    // A model config key through --set model_config. is checked, not only warned about.
    ERR_SET(J("{%s}", m), "model_config.hiden_size=3", "unknown model config key 'hiden_size'",
           "did you mean 'hidden_size'");
    // An unknown backend names the known ones.
    ERR_SET(J("{%s}", m), "backend=gpu", "key 'backend'", "\"gpu\" is not a backend", "known: cpu, ref");
    // Validation asked for with no validation split is an error, not a silent skip.
    ERR(J("{%s, \"data\": {\"split\": \"100,0\"}, \"log\": {\"eval_every\": 10}}", m), "'log.eval_every' = 10",
        "data.split=99,1", "log.eval_every=0");
    // Ill-typed values.
    ERR(J("{%s, \"optimizer\": {\"lr\": \"fast\"}}", m), "cfgdir/t.json", "'optimizer.lr'", "expected a number",
        "got a string");
    ERR(J("{%s, \"steps\": 10.5}", m), "'steps'", "expected an integer", "10.5");
    ERR(J("{%s, \"steps\": true}", m), "'steps'", "expected an integer", "got a boolean");
    ERR(J("{%s, \"precision\": \"fp16\"}", m), "'precision'", "\"fp16\" is not one of fp32, bf16, fp8");
    ERR(J("{%s, \"precision\": 16}", m), "'precision'", "expected a string");
    ERR(J("{%s, \"optimizer\": 3}", m), "'optimizer'", "expected an object");
    ERR(J("{%s, \"data\": {\"synthetic\": 1}}", m), "'data.synthetic'", "expected true or false");
    ERR(J("{%s, \"tokenizer\": null}", m), "'tokenizer'", "expected a string, got null");
    ERR(J("{%s, \"steps\": 5, \"steps\": 6}", m), "'steps' appears twice");
    // Ranges and cross-key rules.
    ERR(J("{%s, \"optimizer\": {\"beta1\": 1.0}}", m), "'optimizer.beta1' = 1", "out of range");
    ERR(J("{%s, \"optimizer\": {\"lr\": 0}}", m), "'optimizer.lr' = 0", "must be > 0");
    ERR(J("{%s, \"seq_len\": 1}", m), "'seq_len' = 1", "out of range");
    ERR(J("{%s, \"micro_batch\": 8, \"global_batch\": 12}", m), "'global_batch' = 12", "multiple of 'micro_batch' = 8");
    ERR(J("{%s, \"optimizer\": {\"lr\": 1e-4, \"min_lr\": 1e-3}}", m), "'optimizer.min_lr'", "larger than");
    ERR(J("{%s, \"schedule\": {\"type\": \"wsd-cosine\"}}", m), "wsd-cosine", "'schedule.decay_steps'");
    ERR(J("{%s, \"schedule\": {\"type\": \"wsd-cosine\", \"warmup_steps\": 50, \"decay_start\": 10, "
          "\"decay_steps\": 5}}", m), "'schedule.decay_start' = 10");
    ERR("{}", "cfgdir/t.json", "exactly one of 'model'", "'init_from'");
    ERR("{\"model\": \"a\", \"init_from\": \"b\"}", "both are set");
    ERR(J("{%s, \"data\": {\"synthetic\": true, \"paths\": [{\"prefix\": \"x\"}]}}", m), "'data.synthetic'",
        "'data.paths'");
    ERR(J("{%s, \"data\": {\"synthetic\": false}}", m), "no training data");
    ERR(J("{%s, \"data\": {\"paths\": [{\"weight\": 1}]}}", m), "'data.paths[0].prefix'");
    ERR(J("{%s, \"data\": {\"paths\": [{\"prefix\": \"x\", \"w\": 1}]}}", m), "'data.paths[0].w'");
    ERR(J("{%s, \"data\": {\"paths\": [{\"prefix\": \"x\", \"weight\": -1}]}}", m), "'data.paths[0].weight'", "> 0");
    ERR(J("{%s, \"data\": {\"paths\": {\"prefix\": \"x\"}}}", m), "'data.paths'", "expected an array");
    ERR(J("{%s, \"data\": {\"split\": \"99;1\"}}", m), "'data.split' = \"99;1\"");
    ERR(J("{%s, \"data\": {\"split\": \"0,0\"}}", m), "'data.split'");
    // Syntax: the line is reported.
    ERR("{\n\"model\": \"m.json\",\n\"steps\": 5,,\n}", "cfgdir/t.json", "invalid JSON near line 3");
    ERR("[1, 2]", "expected a JSON object");
    // --set: unknown key, wrong type, bad enum, malformed, range.
    ERR_SET(J("{%s}", m), "optimizer.lrr=1", "--set", "unknown key 'optimizer.lrr'", "did you mean 'optimizer.lr'");
    ERR_SET(J("{%s}", m), "steps=abc", "--set steps=abc", "'steps'", "expected an integer");
    ERR_SET(J("{%s}", m), "steps=2.5", "--set steps=2.5", "expected an integer");
    ERR_SET(J("{%s}", m), "optimizer.lr=", "'optimizer.lr'", "expected a number");
    ERR_SET(J("{%s}", m), "optimizer.lr=nan", "not a finite number");
    ERR_SET(J("{%s}", m), "data.synthetic=yes", "'data.synthetic'", "expected true or false");
    ERR_SET(J("{%s}", m), "schedule.type=linear", "'schedule.type'", "\"linear\" is not one of");
    ERR_SET(J("{%s}", m), "steps", "--set steps", "expected key=value");
    ERR_SET(J("{%s}", m), "=5", "expected key=value");
    ERR_SET(J("{%s}", m), "optimizer.beta2=-0.5", "--set optimizer.beta2=-0.5", "out of range");
    ERR_SET(J("{%s}", m), "tokenizer=null", "'tokenizer' cannot be null");
    ERR_SET(J("{%s}", m), "data.paths=notjson", "'data.paths'", "JSON array");
    ERR_SET(J("{%s}", m), "seed=9007199254740994", "'seed'");  // beyond 2^53: not exact
    // Parallel keys: ranges and types (layouts that do not fit the world are the trainer's).
    ERR_SET(J("{%s}", m), "bucket_mb=0", "'bucket_mb' = 0", "out of range");
    ERR_SET(J("{%s}", m), "bucket_mb=1.5", "'bucket_mb'", "expected an integer");
    ERR_SET(J("{%s}", m), "exit_interval=-1", "'exit_interval' = -1", "out of range");
    ERR_SET(J("{%s}", m), "overlap_grad_reduce=2", "'overlap_grad_reduce'", "expected true or false");
    ERR_SET(J("{%s}", m), "expert_parallel_size=0", "'expert_parallel_size' = 0", "out of range");
    ERR_SET(J("{%s}", m), "moe_receive_capacity=0", "'moe_receive_capacity' = 0", "must be > 0");
    ERR(J("{%s, \"moe_receive_capacity\": -1}", m), "'moe_receive_capacity' = -1", "must be > 0");
    ERR_SET(J("{%s}", m), "moe_receive_capacity=nan", "'moe_receive_capacity'", "not a finite number");
    ERR_SET(J("{%s}", m), "optimizer.exp_avg_dtype=fp16", "'optimizer.exp_avg_dtype'", "\"fp16\" is not one of fp32, bf16");
    ERR_SET(J("{%s}", m), "optimizer.exp_avg_sq_dtype=fp8", "'optimizer.exp_avg_sq_dtype'", "\"fp8\" is not one of fp32, bf16");
    ERR(J("{%s, \"tensor_parallel_size\": \"2\"}", m), "'tensor_parallel_size'", "expected an integer");
    ERR_SET(J("{%s}", m), "recompute_modules=core_attn", "'recompute_modules'", "'core_attn' is not a module",
            "known: mla_up_proj, moe_act, layernorm");
    ERR_SET(J("{%s}", m), "recompute_modules=mla_up_proj,mlp", "'mlp' is not a module");
#undef J
}

// --- serialisation ---------------------------------------------------------------------------------

static void test_round_trip(void) {
    nm_train_config a, b;
    nm_error err;
    const char *j = "{\"model\": \"m.json\", \"data\": {\"paths\": [{\"prefix\": \"d/x\", \"weight\": 0.25}]},"
                    " \"optimizer\": {\"lr\": 0.0003, \"eps\": 1e-10}, \"schedule\": {\"type\": \"wsd\"},"
                    " \"seed\": 77, \"global_batch\": 32}";
    EXPECT(parse(&a, j, NULL, 0, &err) == 0, "%s", err.msg);
    if (!a.source_path) return;
    char *t1 = nm_train_config_to_json(&a);
    // Read back as a checkpoint would: paths are already resolved, so no base directory.
    EXPECT(nm_train_config_parse(&b, t1, "trainer.json", NULL, NULL, 0, &err) == 0, "%s\n%s", err.msg, t1);
    if (b.source_path) {
        char *t2 = nm_train_config_to_json(&b);
        EXPECT(!strcmp(t1, t2), "round trip differs:\n%s\n---\n%s", t1, t2);
        EXPECT(!strcmp(b.model, "cfgdir/m.json") && !strcmp(b.data_paths[0].prefix, "cfgdir/d/x"), "paths kept");
        EXPECT(b.optimizer.eps == 1e-10 && b.optimizer.lr == 3e-4 && b.seed == 77 && b.global_batch == 32 &&
                   b.accum_steps == 4 && b.schedule.type == NM_LR_WSD && b.data_synthetic == 0, "values kept");
        nm_free(t2);
    }
    // It is JSON with the sections as objects and every key present.
    cJSON *root = cJSON_Parse(t1);
    EXPECT(root != NULL, "to_json output is not JSON");
    if (root) {
        const cJSON *opt = cJSON_GetObjectItemCaseSensitive(root, "optimizer");
        const cJSON *lr = cJSON_GetObjectItemCaseSensitive(opt, "lr");
        EXPECT(cJSON_IsNumber(lr) && lr->valuedouble == 3e-4, "optimizer.lr in JSON");
        EXPECT(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(root, "init_from")), "init_from null");
        EXPECT(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "data"),
                                                               "synthetic")), "effective synthetic written");
        cJSON_Delete(root);
    }
    nm_free(t1);
    nm_train_config_free(&a);
    nm_train_config_free(&b);

    // describe lists every key once.
    FILE *fp = tmpfile();
    if (fp) {
        nm_train_config_describe(fp);
        long n = ftell(fp);
        rewind(fp);
        char buf[8192] = {0};
        size_t got = fread(buf, 1, sizeof(buf) - 1, fp);
        EXPECT(n > 0 && got == (size_t)n && strstr(buf, "optimizer.lr") && strstr(buf, "log.eval_batches"),
               "describe output");
        fclose(fp);
    }
}

int main(void) {
    test_shipped();
    test_defaults_and_paths();
    test_overrides();
    test_errors();
    test_round_trip();
    if (failures) {
        fprintf(stderr, "test_train_config: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_train_config: ok\n");
    return 0;
}
