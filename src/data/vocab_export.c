// vocab_export.c: a tokenizer as the export formats need it (nm_export_vocab_load, declared in
// data/vocab_export.h; the struct itself is io/export_vocab.h's, so the io writers need nothing
// of the data layer).
//
// Reference: formats.md 3.5/3.7 (what llama.cpp reads), 4.2-4.3 (tokenizer.json model and
// added_tokens), llama.cpp llama-vocab.cpp (the pre-tokenizer regex lists the names stand for).
#include "data/vocab_export.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/tokenizer.h"
#include "data/tokenizer_internal.h"
#include "core/fileio.h"

// DeepSeek-V3's Split patterns, in order; llama.cpp's DEEPSEEK3_LLM regex list is the same.
static const char *const deepseek_v3_splits[] = {
    "\\p{N}{1,3}",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+",  // [一-龥぀-ゟ゠-ヿ]+
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+"
    "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

// The HF tokenizer.json equivalent of the "bytes" tokenizer (see the header).
static char *bytes_tokenizer_json(void) {
    size_t cap = 64 * 1024, n = 0;
    char *s = nm_malloc(cap);
    n += (size_t)snprintf(s + n, cap - n,
                          "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n"
                          "  \"added_tokens\": [\n    {\"id\": 256, \"content\": \"<|endoftext|>\", \"single_word\": false, "
                          "\"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}\n  ],\n"
                          "  \"normalizer\": null,\n"
                          "  \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, "
                          "\"use_regex\": true},\n"
                          "  \"post_processor\": null,\n"
                          "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, "
                          "\"use_regex\": true},\n"
                          "  \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
                          "\"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, \"fuse_unk\": false, "
                          "\"byte_fallback\": false, \"ignore_merges\": false,\n    \"vocab\": {");
    for (int b = 0; b < 256; b++) {
        char u[3] = {0};
        int k = nm_bytelevel_utf8((uint8_t)b, u);
        u[k] = 0;
        const char *esc = (k == 1 && (u[0] == '"' || u[0] == '\\')) ? "\\" : "";
        n += (size_t)snprintf(s + n, cap - n, "%s\"%s%s\": %d", b ? ", " : "", esc, u, b);
    }
    snprintf(s + n, cap - n, "},\n    \"merges\": []\n  }\n}\n");
    return s;
}

static int set_token(nm_export_vocab *v, int64_t id, const char *text, int32_t type, const char *path, nm_error *err) {
    if (id < 0 || id >= v->n) return nm_error_set(err, "%s: token id %lld out of range", path, (long long)id);
    if (v->tokens[id] && type == NM_TOKEN_NORMAL) {
        return nm_error_set(err, "%s: model.vocab: id %lld is given to two tokens", path, (long long)id);
    }
    nm_free(v->tokens[id]);
    v->tokens[id] = nm_strdup(text);
    v->types[id] = type;
    return 0;
}

static int detect_pre(nm_export_vocab *v, const cJSON *pt, const char *path, nm_error *err) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(pt, "type");
    if (cJSON_IsString(ty) && !strcmp(ty->valuestring, "ByteLevel")) {
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pt, "use_regex");
        if (!re || cJSON_IsTrue(re)) {
            v->pre = "gpt-2";  // llama.cpp's GPT2 pre-tokenizer is the GPT-2 regex ByteLevel uses
            return 0;
        }
    } else if (cJSON_IsString(ty) && !strcmp(ty->valuestring, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers");
        int n = cJSON_GetArraySize(list), ok = n == 4;
        for (int i = 0; ok && i < 3; i++) {
            const cJSON *step = cJSON_GetArrayItem(list, i);
            const cJSON *pat = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(step, "pattern"), "Regex");
            ok = cJSON_IsString(pat) && !strcmp(pat->valuestring, deepseek_v3_splits[i]);
        }
        if (ok) {
            v->pre = "deepseek-v3";
            return 0;
        }
    }
    char *text = cJSON_PrintUnformatted(pt);
    nm_error_set(err, "%s: pre_tokenizer %.300s has no llama.cpp equivalent known to the exporter (supported: "
                      "ByteLevel with use_regex, i.e. GPT-2, and DeepSeek-V3's Split sequence)", path, text ? text : "?");
    free(text);
    return -1;
}

static int parse(nm_export_vocab *v, const char *path, nm_error *err) {
    cJSON *root = cJSON_Parse(v->tokenizer_json);
    if (!root) return nm_error_set(err, "%s: not valid JSON", path);
    int rc = -1;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    const cJSON *mty = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (!cJSON_IsString(mty) || strcmp(mty->valuestring, "BPE") || !cJSON_IsObject(vocab) || !cJSON_IsArray(merges)) {
        nm_error_set(err, "%s: model: expected a BPE model with a vocab object and a merges array", path);
        goto done;
    }
    if (detect_pre(v, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), path, err)) goto done;
    int64_t n = 0;
    for (const cJSON *e = vocab->child; e; e = e->next) {
        if (!cJSON_IsNumber(e)) { nm_error_set(err, "%s: model.vocab[\"%s\"]: not an id", path, e->string); goto done; }
        if ((int64_t)e->valuedouble + 1 > n) n = (int64_t)e->valuedouble + 1;
    }
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        if (cJSON_IsNumber(id) && (int64_t)id->valuedouble + 1 > n) n = (int64_t)id->valuedouble + 1;
    }
    v->n = n;
    v->tokens = nm_calloc((size_t)n + 1, sizeof(char *));
    v->types = nm_calloc((size_t)n + 1, sizeof(int32_t));
    for (const cJSON *e = vocab->child; e; e = e->next) {
        if (set_token(v, (int64_t)e->valuedouble, e->string, NM_TOKEN_NORMAL, path, err)) goto done;
    }
    for (const cJSON *a = added ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id"), *content = cJSON_GetObjectItemCaseSensitive(a, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(content)) {
            nm_error_set(err, "%s: added_tokens: an entry without a numeric id and a content string", path);
            goto done;
        }
        int32_t type = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "special")) ? NM_TOKEN_CONTROL : NM_TOKEN_USER_DEFINED;
        if (set_token(v, (int64_t)id->valuedouble, content->valuestring, type, path, err)) goto done;
    }
    v->n_merges = cJSON_GetArraySize(merges);
    v->merges = nm_calloc((size_t)v->n_merges + 1, sizeof(char *));
    int64_t i = 0;
    for (const cJSON *m = merges->child; m; m = m->next, i++) {
        // Either "a b" (older files) or ["a", "b"] (tokenizers >= 0.20); GGUF wants "a b".
        // ByteLevel tokens hold no literal space (it is U+0120), so the join is unambiguous.
        if (cJSON_IsString(m)) {
            v->merges[i] = nm_strdup(m->valuestring);
        } else if (cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) && cJSON_IsString(m->child->next)) {
            size_t la = strlen(m->child->valuestring), lb = strlen(m->child->next->valuestring);
            v->merges[i] = nm_malloc(la + lb + 2);
            memcpy(v->merges[i], m->child->valuestring, la);
            v->merges[i][la] = ' ';
            memcpy(v->merges[i] + la + 1, m->child->next->valuestring, lb + 1);
        } else {
            nm_error_set(err, "%s: model.merges[%lld]: neither \"a b\" nor [\"a\", \"b\"]", path, (long long)i);
            goto done;
        }
    }
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}

int nm_export_vocab_load(nm_export_vocab *v, const char *tokenizer, nm_error *err) {
    memset(v, 0, sizeof(*v));
    v->eod = -1;
    // Our own loader first: it refuses what we cannot encode exactly, and gives the eod id.
    nm_tokenizer *tok = NULL;
    if (nm_tokenizer_load(&tok, tokenizer, err)) return -1;
    v->eod = nm_tokenizer_eod(tok);
    nm_tokenizer_free(tok);
    const char *path = tokenizer;
    int rc;
    if (!strcmp(tokenizer, "bytes")) {
        v->tokenizer_json = bytes_tokenizer_json();
        path = "the byte tokenizer";
    } else {
        if (nm_file_read_json(tokenizer, &v->tokenizer_json, NULL, err)) return -1;
        const char *slash = strrchr(tokenizer, '/');
        size_t dir_len = slash ? (size_t)(slash - tokenizer + 1) : 0;
        char *cfg = nm_malloc(dir_len + 32);
        memcpy(cfg, tokenizer, dir_len);
        strcpy(cfg + dir_len, "tokenizer_config.json");
        FILE *probe = fopen(cfg, "rb");
        if (probe) {
            fclose(probe);
            if (nm_file_read_all(cfg, &v->tokenizer_config_json, NULL, err)) {
                nm_free(cfg);
                nm_export_vocab_free(v);
                return -1;
            }
        }
        nm_free(cfg);
    }
    rc = parse(v, path, err);
    if (rc) nm_export_vocab_free(v);
    return rc;
}
