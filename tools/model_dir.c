// model_dir.c: --model resolution shared by the commands (model_dir.h).
#include "model_dir.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fileio.h"
#include "io/hf_dir.h"
#include "train/checkpoint.h"

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

// The tokenizer a checkpoint trained with (trainer.json's "tokenizer"), else the directory's
// tokenizer.json, else the byte tokenizer.
static void find_tokenizer(const char *dir, char *tok, size_t tok_cap) {
    char path[4400];
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    snprintf(tok, tok_cap, "%.4100s", is_file(path) ? path : "bytes");
    snprintf(path, sizeof(path), "%s/trainer.json", dir);
    char *text;
    nm_error ignore;
    if (nm_file_read_all(path, &text, NULL, &ignore) != 0) return;
    cJSON *root = cJSON_Parse(text);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "tokenizer");
    if (cJSON_IsString(t)) snprintf(tok, tok_cap, "%s", t->valuestring);
    cJSON_Delete(root);
    nm_free(text);
}

int nm_resolve_model_dir(const char *model, int64_t step, char *dir, size_t cap, char *tok, size_t tok_cap,
                         nm_error *err) {
    if (strlen(model) > 4000) return nm_error_set(err, "--model: path of %zu bytes is too long", strlen(model));
    if (nm_model_dir_check(model, 1, err) != 0) return -1;
    char path[4400];
    snprintf(path, sizeof(path), "%s/config.json", model);
    if (step >= 0) {
        if (is_file(path)) return nm_error_set(err, "--step: %s is a model directory, not a run directory", model);
        snprintf(dir, cap, "%s/step_%06lld", model, (long long)step);
        snprintf(path, sizeof(path), "%s/config.json", dir);
        if (!is_file(path))
            return nm_error_set(err, "%s: no checkpoint for --step %lld (no %s)", model, (long long)step, path);
    } else if (is_file(path)) {
        snprintf(dir, cap, "%s", model);
    } else if (nm_checkpoint_find_latest(model, dir, cap, err) != 0) {
        return nm_error_prefix(err, "%s is neither a model directory (no config.json) nor a run directory", model);
    }
    if (tok) find_tokenizer(dir, tok, tok_cap);
    return 0;
}
