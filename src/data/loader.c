// loader.c: implementation of loader.h (blend + split + chunks of GPTDataset + rank slicing).
#include "data/loader.h"

#include <inttypes.h>
#include <stdio.h>

#include <math.h>
#include <string.h>

#include "core/fileio.h"
#include "core/rng.h"
#include "data/blend.h"
#include "data/gpt_dataset.h"
#include "data/indexed.h"
#include "data/synthetic.h"
#include "io/npy.h"

#define PURPOSE_EPOCH 0x45504f43u   // "EPOC": numpy seeds of the chunks after the first

static const char *split_names[3] = {"train", "valid", "test"};

typedef struct source {
    nm_indexed *ds;             // owned
    nm_gpt_config base;         // split range, L, x = 1, seed, num_samples of chunk 0
    int64_t n_first;            // samples in chunk 0
    int64_t n_epoch;            // samples in each later (one-epoch) chunk
    int64_t chunk;              // chunk held in g
    nm_gpt_dataset *g;          // indices of that chunk
} source;

struct nm_loader {
    nm_data_spec spec;          // prefixes and weights are not kept (borrowed only during create);
                                // cache_dir points at cache_dir below
    int which, rank, world;
    int n;                      // sources
    source *src;                // (n,)
    double *weights;            // (n,) normalised
    int64_t *counts;            // (n,) blend counts at the cursor
    nm_blend_state blend;       // its .next is the cursor
    double floor;               // synthetic entropy floor or NAN
    int64_t tokens;             // split tokens over all sources
    char *cache_dir;            // owned copy of spec->cache_dir (NULL: none)
    // Megatron's BlendedDataset arrays for the split's first num_samples positions, mapped from
    // the cache (a blend with data.cache_dir and a known size): position s is sample
    // blend_sample[s] of dataset blend_index[s], so a cursor anywhere costs nothing. Past them,
    // and without them, the greedy rule runs on (blend.h).
    const int16_t *blend_index;
    const int64_t *blend_sample;
    int64_t blend_size;         // positions the arrays cover (0: none)
    int counts_valid;           // counts[] match blend.next (recomputed on leaving the arrays)
    nm_npy blend_maps[2];
};

void nm_data_spec_default(nm_data_spec *spec) {
    memset(spec, 0, sizeof(*spec));
    spec->synthetic_tokens = (int64_t)1 << 21;
    spec->synthetic_seed = 1;
    spec->seed = 1234;
    spec->seq_len = 256;
    spec->split[0] = 99;
    spec->split[1] = 1;
    spec->split[2] = 0;
    spec->blend_surplus = 0.005;
}

// Builds chunk c of source s (no-op if held).
static int load_chunk(source *s, int64_t c, nm_error *err) {
    if (s->g && s->chunk == c) return 0;
    nm_gpt_dataset_destroy(s->g);
    s->g = NULL;
    nm_gpt_config cfg = s->base;
    if (c > 0) {
        cfg.num_samples = 0;   // exactly one epoch
        cfg.seed = (uint32_t)nm_rng_key(s->base.seed, NM_RNG_DATA, PURPOSE_EPOCH, (uint64_t)c);
    }
    if (nm_gpt_dataset_create(&s->g, s->ds, &cfg, err) != 0) return -1;
    s->chunk = c;
    return 0;
}

// Sample j of source s's endless stream.
static int source_sample(source *s, int64_t j, int32_t *out, nm_error *err) {
    int64_t c = 0, local = j;
    if (j >= s->n_first) {
        c = 1 + (j - s->n_first) / s->n_epoch;
        local = (j - s->n_first) % s->n_epoch;
    }
    if (load_chunk(s, c, err) != 0) return -1;
    return nm_gpt_dataset_get(s->g, local, out, err);
}

void nm_loader_destroy(nm_loader *l) {
    if (!l) return;
    for (int i = 0; i < l->n; i++) {
        nm_gpt_dataset_destroy(l->src[i].g);
        nm_indexed_close(l->src[i].ds);
    }
    nm_free(l->src);
    nm_free(l->weights);
    nm_free(l->counts);
    nm_free(l->cache_dir);
    nm_npy_unmap(&l->blend_maps[0]);
    nm_npy_unmap(&l->blend_maps[1]);
    nm_free(l);
}

// --- the blend's index mappings ------------------------------------------------------------------
//
// Files <cache_dir>/<hash>-BlendedDataset-{description.txt, dataset_index.npy (int16),
// dataset_sample_index.npy (int64)}, as Megatron's BlendedDataset caches them
// (helpers.cpp build_blending_indices; docs/formats.md 1.7 j): the hash (FNV-1a 64) of the
// description, which names the datasets (by their own cache names), the weights, the split and
// the size. Written by whichever rank builds first (the trainer's rank 0, the others waiting),
// the description last; mapped by every rank; a mismatched or damaged one is rebuilt with a
// notice, never trusted.

static void blend_describe(const nm_loader *l, int64_t size, char *out, size_t cap) {
    size_t k = (size_t)snprintf(out, cap, "{\"class\": \"BlendedDataset\", \"datasets\": [");
    for (int i = 0; i < l->n && k < cap; i++)
        k += (size_t)snprintf(out + k, cap - k, "%s\"%s\"", i ? ", " : "", l->src[i].g->cache_name);
    k += (size_t)snprintf(out + k, k < cap ? cap - k : 0, "], \"weights\": [");
    for (int i = 0; i < l->n && k < cap; i++) k += (size_t)snprintf(out + k, cap - k, "%s%.17g", i ? ", " : "", l->weights[i]);
    if (k < cap)
        snprintf(out + k, cap - k, "], \"split\": \"%s\", \"size\": %" PRId64 ", \"format\": \"nano-megatron 1\"}\n",
                 split_names[l->which], size);
}

static void blend_path(const nm_loader *l, const char *hash, const char *kind, const char *ext, char *out, size_t cap) {
    snprintf(out, cap, "%s/%s-BlendedDataset-%s.%s", l->cache_dir, hash, kind, ext);
}

// 0: mapped; 1: absent or unusable (build it, with a notice when it was there but wrong).
static int blend_map(nm_loader *l, const char *hash, const char *desc, int64_t size) {
    char path[4400];
    blend_path(l, hash, "description", "txt", path, sizeof path);
    char *saved = NULL;
    nm_error why;
    if (nm_file_read_all(path, &saved, NULL, &why) != 0) return 1;
    int same = strcmp(saved, desc) == 0;
    nm_free(saved);
    if (!same) {
        fprintf(stderr, "notice: %s describes another blend; rebuilding its index mappings\n", path);
        return 1;
    }
    const char *kinds[2] = {"dataset_index", "dataset_sample_index"}, *descr[2] = {"<i2", "<i8"};
    for (int k = 0; k < 2; k++) {
        blend_path(l, hash, kinds[k], "npy", path, sizeof path);
        nm_npy *m = &l->blend_maps[k];
        int bad = nm_npy_map(m, path, &why) != 0;
        if (!bad && (strcmp(m->descr, descr[k]) != 0 || m->ndim != 1 || m->shape[0] != size)) {
            snprintf(why.msg, sizeof why.msg, "%.1900s: dtype %s and %lld rows, expected %s and %lld", path, m->descr,
                     (long long)m->shape[0], descr[k], (long long)size);
            bad = 1;
            nm_npy_unmap(m);
        }
        if (bad) {
            fprintf(stderr, "notice: %s; rebuilding the blend's index mappings\n", why.msg);
            for (int j = 0; j < k; j++) nm_npy_unmap(&l->blend_maps[j]);
            return 1;
        }
    }
    return 0;
}

// Maps (building and writing first when needed) the blend's arrays for `size` positions.
static int blend_cache(nm_loader *l, int64_t size, nm_error *err) {
    char desc[8192], hash[32];
    blend_describe(l, size, desc, sizeof desc);
    uint64_t h = 1469598103934665603ull;  // FNV-1a 64, as the GPTDataset cache names
    for (const unsigned char *p = (const unsigned char *)desc; *p; p++) h = (h ^ *p) * 1099511628211ull;
    snprintf(hash, sizeof hash, "%016" PRIx64, h);
    if (blend_map(l, hash, desc, size) != 0) {
        int16_t *index = nm_malloc((size_t)size * sizeof(int16_t));
        int64_t *sample = nm_malloc((size_t)size * sizeof(int64_t));
        nm_blend_build_indices(l->weights, l->n, size, index, sample);
        fprintf(stderr, "data: built the blend's index mappings (%d datasets, %lld samples) into %s\n", l->n,
                (long long)size, l->cache_dir);
        char path[4400];
        int rc = nm_mkdir_p(l->cache_dir, err) != 0 ? nm_error_prefix(err, "data.cache_dir") : 0;
        blend_path(l, hash, "dataset_index", "npy", path, sizeof path);
        if (rc == 0) rc = nm_npy_write(path, "<i2", &size, 1, index, err);
        blend_path(l, hash, "dataset_sample_index", "npy", path, sizeof path);
        if (rc == 0) rc = nm_npy_write(path, "<i8", &size, 1, sample, err);
        nm_free(index);
        nm_free(sample);
        if (rc != 0) return -1;
        blend_path(l, hash, "description", "txt", path, sizeof path);
        if (nm_file_write_atomic(path, desc, strlen(desc), err) != 0) return -1;
        if (blend_map(l, hash, desc, size) != 0)
            return nm_error_set(err, "%s: the blend's index mappings just written do not map back", l->cache_dir);
    }
    l->blend_index = l->blend_maps[0].data;
    l->blend_sample = l->blend_maps[1].data;
    l->blend_size = size;
    l->counts_valid = 0;  // the arrays are read without counting: recounted on leaving them
    return 0;
}

int nm_loader_create(nm_loader **out, const nm_data_spec *spec, int which, int rank, int world, nm_error *err) {
    NM_CHECK(which >= 0 && which < 3 && world >= 1 && rank >= 0 && rank < world, "which=%d rank=%d world=%d", which, rank, world);
    if (spec->n_sources < 0 || (spec->n_sources > 0 && !spec->prefixes) || (spec->n_sources > 1 && !spec->weights))
        return nm_error_set(err, "data: %d datasets given without their prefixes or blend weights", spec->n_sources);
    if (spec->seq_len < 1) return nm_error_set(err, "data: seq_len = %lld must be >= 1", (long long)spec->seq_len);
    for (int k = 0; k < 3; k++) {
        if (!(spec->split[k] >= 0) || !isfinite(spec->split[k]) || spec->num_samples[k] < 0) {
            return nm_error_set(err, "data: split weight %s = %g / num_samples = %lld invalid", split_names[k], spec->split[k],
                                (long long)spec->num_samples[k]);
        }
    }
    if (!(spec->split[0] + spec->split[1] + spec->split[2] > 0)) return nm_error_set(err, "data: split weights are all 0");
    nm_loader *l = nm_calloc(1, sizeof(*l));
    l->spec = *spec;
    l->spec.prefixes = NULL;
    l->spec.weights = NULL;
    l->cache_dir = spec->cache_dir && *spec->cache_dir ? nm_strdup(spec->cache_dir) : NULL;
    l->spec.cache_dir = l->cache_dir;
    l->which = which;
    l->rank = rank;
    l->world = world;
    l->n = spec->n_sources > 0 ? spec->n_sources : 1;
    l->src = nm_calloc((size_t)l->n, sizeof(source));
    l->weights = nm_calloc((size_t)l->n, sizeof(double));
    l->counts = nm_calloc((size_t)l->n, sizeof(int64_t));
    l->floor = NAN;
    if (l->n == 1) {
        l->weights[0] = 1.0;
    } else if (nm_blend_normalize(spec->weights, l->n, l->weights) != 0) {
        nm_loader_destroy(l);
        return nm_error_set(err, "data: blend weights must be finite, >= 0 and not all 0");
    }
    for (int i = 0; i < l->n; i++) {
        source *s = &l->src[i];
        s->chunk = -1;
        int rc;
        if (spec->n_sources == 0) {
            nm_synthetic_params p;
            nm_synthetic_params_default(&p);
            p.seed = spec->synthetic_seed;
            rc = nm_synthetic_build(&s->ds, &p, spec->synthetic_tokens, err);
            if (rc == 0) {
                nm_synthetic *syn;
                if (nm_synthetic_create(&syn, &p, err) == 0) {
                    l->floor = nm_synthetic_entropy_floor(syn);
                    nm_synthetic_destroy(syn);
                }
            }
        } else {
            rc = nm_indexed_open(&s->ds, spec->prefixes[i], err);
        }
        if (rc != 0) {
            nm_loader_destroy(l);
            return -1;
        }
        int64_t target = spec->num_samples[which];
        s->base.seq_len = spec->seq_len;
        s->base.add_extra_token = 1;
        s->base.seed = spec->seed;
        s->base.cache_dir = l->cache_dir;
        s->base.num_samples = l->n == 1 ? target : (target ? nm_blend_dataset_size(l->weights[i], target, spec->blend_surplus) : 0);
        nm_gpt_split_range(spec->split, 3, which, s->ds->n_seqs, &s->base.seq_begin, &s->base.seq_end);
        if (s->base.seq_begin == s->base.seq_end) {
            nm_error_set(err, "%s: the %s split is empty (split %g,%g,%g of %lld sequences)", s->ds->name, split_names[which],
                         spec->split[0], spec->split[1], spec->split[2], (long long)s->ds->n_seqs);
            nm_loader_destroy(l);
            return -1;
        }
        if (load_chunk(s, 0, err) != 0) {
            nm_error_prefix(err, "%s split", split_names[which]);
            nm_loader_destroy(l);
            return -1;
        }
        s->n_first = s->g->n_samples;
        s->n_epoch = (s->g->tokens_per_epoch - 1) / spec->seq_len;
        l->tokens += s->g->tokens_per_epoch;
    }
    l->blend = (nm_blend_state){.n = l->n, .weights = l->weights, .next = 0, .counts = l->counts};
    l->counts_valid = 1;
    if (l->n > 1 && l->cache_dir && spec->num_samples[which] > 0) {
        if (l->n > INT16_MAX) {
            nm_loader_destroy(l);
            return nm_error_set(err, "data: a blend of %d datasets: Megatron's dataset_index is int16 (at most %d)",
                                spec->n_sources, INT16_MAX);
        }
        // Megatron's blend size for a split of S samples: sum_i ceil(S w_i) (formats.md 1.8), a
        // few more than S; the arrays of any size are prefixes of one another
        int64_t size = 0;
        for (int i = 0; i < l->n; i++) size += (int64_t)ceil((double)spec->num_samples[which] * l->weights[i]);
        if (blend_cache(l, size, err) != 0) {
            nm_loader_destroy(l);
            return -1;
        }
    }
    *out = l;
    return 0;
}

// counts[] at the end of the cached arrays, where the greedy rule takes over: each dataset's
// last sample there plus one.
static void counts_at_blend_end(nm_loader *l) {
    memset(l->counts, 0, sizeof(int64_t) * (size_t)l->n);
    for (int64_t s = 0; s < l->blend_size; s++) l->counts[l->blend_index[s]] = l->blend_sample[s] + 1;
    l->blend.next = l->blend_size;
    l->counts_valid = 1;
}

// The (source, sample) of the next global position; advances the blend.
static int next_pick(nm_loader *l, int64_t *j) {
    int64_t s = l->blend.next;
    if (s < l->blend_size) {
        l->blend.next++;
        *j = l->blend_sample[s];
        return l->blend_index[s];
    }
    if (!l->counts_valid) counts_at_blend_end(l);
    return nm_blend_next(&l->blend, j);
}

int nm_loader_next_batch(nm_loader *l, int32_t *tokens, int64_t B, nm_error *err) {
    NM_CHECK(B >= 1, "B=%lld", (long long)B);
    int64_t row = l->spec.seq_len + 1;
    int64_t first = (int64_t)l->rank * B, last = first + B;
    for (int64_t r = 0; r < B * l->world; r++) {
        int64_t j;
        int i = next_pick(l, &j);
        if (r < first || r >= last) continue;   // another rank's row: only the blend advances
        if (source_sample(&l->src[i], j, tokens + (r - first) * row, err) != 0) return -1;
    }
    return 0;
}

nm_data_cursor nm_loader_get_cursor(const nm_loader *l) {
    return (nm_data_cursor){.sample = l->blend.next};
}

void nm_loader_set_cursor(nm_loader *l, nm_data_cursor cursor) {
    NM_CHECK(cursor.sample >= 0, "cursor sample %lld", (long long)cursor.sample);
    memset(l->counts, 0, sizeof(int64_t) * (size_t)l->n);
    l->blend.next = 0;
    if (l->n == 1) {
        l->counts[0] = l->blend.next = cursor.sample;
        return;
    }
    if (l->blend_size > 0) {  // within the cached arrays: nothing to replay
        if (cursor.sample <= l->blend_size) {
            l->blend.next = cursor.sample;
            l->counts_valid = 0;
            return;
        }
        counts_at_blend_end(l);
    }
    int64_t j;
    while (l->blend.next < cursor.sample) next_pick(l, &j);
}

int nm_loader_sample(nm_loader *l, int64_t s, int32_t *out, nm_error *err) {
    NM_CHECK(s >= 0, "sample %lld", (long long)s);
    if (l->n == 1) return source_sample(&l->src[0], s, out, err);
    if (s < l->blend_size) return source_sample(&l->src[l->blend_index[s]], l->blend_sample[s], out, err);
    int64_t *counts = nm_calloc((size_t)l->n, sizeof(int64_t));
    nm_blend_state st = {.n = l->n, .weights = l->weights, .next = 0, .counts = counts};
    int64_t j = 0;
    int i = 0;
    while (st.next <= s) i = nm_blend_next(&st, &j);
    nm_free(counts);
    return source_sample(&l->src[i], j, out, err);
}

int64_t nm_loader_seq_len(const nm_loader *l) { return l->spec.seq_len; }
int64_t nm_loader_tokens(const nm_loader *l) { return l->tokens; }
double nm_loader_entropy_floor(const nm_loader *l) { return l->floor; }

static void human(char *buf, size_t size, double v) {
    if (v >= 1e9) snprintf(buf, size, "%.1fG", v / 1e9);
    else if (v >= 1e6) snprintf(buf, size, "%.1fM", v / 1e6);
    else if (v >= 1e3) snprintf(buf, size, "%.1fk", v / 1e3);
    else snprintf(buf, size, "%.0f", v);
}

void nm_loader_describe(const nm_loader *l, char *buf, size_t size) {
    char tok[32];
    human(tok, sizeof(tok), (double)l->tokens);
    if (l->spec.n_sources == 0) {
        snprintf(buf, size, "synthetic corpus, %s %s tokens (entropy floor %.4f nats/token)", tok, split_names[l->which],
                 l->floor);
        return;
    }
    size_t k = (size_t)snprintf(buf, size, "%s %s tokens from", tok, split_names[l->which]);
    for (int i = 0; i < l->n && k < size; i++) {
        k += (size_t)snprintf(buf + k, size - k, "%s %s", i ? "," : "", l->src[i].ds->name);
        if (l->n > 1 && k < size) k += (size_t)snprintf(buf + k, size - k, " (%.1f%%)", 100.0 * l->weights[i]);
    }
}
