// schedule.c: learning-rate and step-switched weight schedules (see schedule.h for the
// formulas and the 1-based step convention).
#include "train/schedule.h"

#include <math.h>
#include <string.h>

#include "core/check.h"

// M_PI is an XSI extension that strict C11 headers need not define.
#define PI 3.14159265358979323846

static const char *const lr_names[] = {"constant", "cosine", "wsd", "wsd-cosine"};
static const char *const wsd_names[] = {"linear", "1-sqrt"};

const char *nm_lr_schedule_name(nm_lr_schedule_type t) {
    NM_CHECK((int)t >= 0 && (int)t < 4, "bad schedule type %d", (int)t);
    return lr_names[t];
}

int nm_lr_schedule_parse(const char *name, nm_lr_schedule_type *out) {
    for (int i = 0; i < 4; i++) {
        if (!strcmp(name, lr_names[i])) {
            *out = (nm_lr_schedule_type)i;
            return 0;
        }
    }
    return -1;
}

const char *nm_wsd_decay_name(nm_wsd_decay d) {
    NM_CHECK((int)d >= 0 && (int)d < 2, "bad wsd decay %d", (int)d);
    return wsd_names[d];
}

int nm_wsd_decay_parse(const char *name, nm_wsd_decay *out) {
    for (int i = 0; i < 2; i++) {
        if (!strcmp(name, wsd_names[i])) {
            *out = (nm_wsd_decay)i;
            return 0;
        }
    }
    return -1;
}

// Half-cosine from hi (p = 0) to lo (p = 1); p clamped.
static double cosine(double hi, double lo, double p) {
    if (p < 0.0) p = 0.0;
    if (p > 1.0) p = 1.0;
    return lo + 0.5 * (hi - lo) * (1.0 + cos(PI * p));
}

double nm_lr_at(const nm_lr_schedule *s, int64_t step) {
    const double L = s->lr_max, l = s->lr_min;
    const int64_t W = s->warmup_steps;
    if (W > 0 && step <= W) return L * (double)(step < 0 ? 0 : step) / (double)W;

    switch (s->type) {
    case NM_LR_CONSTANT:
        return L;
    case NM_LR_COSINE: {
        int64_t span = s->total_steps - W;
        if (span <= 0) return l;  // warm-up covers the whole run
        return cosine(L, l, (double)(step - W) / (double)span);
    }
    case NM_LR_WSD: {
        NM_CHECK(s->decay_fraction > 0.0 && s->decay_fraction <= 1.0, "decay_fraction %g", s->decay_fraction);
        int64_t D = (int64_t)llround(s->decay_fraction * (double)s->total_steps);
        if (D < 1) D = 1;
        int64_t start = s->total_steps - D;
        if (step <= start) return L;
        double p = (double)(step - start) / (double)D;
        if (p > 1.0) p = 1.0;
        if (s->wsd_decay == NM_WSD_SQRT) return l + (L - l) * (1.0 - sqrt(p));
        return L - (L - l) * p;
    }
    case NM_LR_WSD_COSINE: {
        NM_CHECK(s->decay_steps >= 1, "decay_steps %lld", (long long)s->decay_steps);
        if (step <= s->decay_start) return L;
        return cosine(L, l, (double)(step - s->decay_start) / (double)s->decay_steps);
    }
    }
    NM_PANIC("bad schedule type %d", (int)s->type);
}

double nm_mtp_weight_at(double weight, double weight_after, int64_t switch_step, int64_t step) {
    return (switch_step > 0 && step > switch_step) ? weight_after : weight;
}

double nm_bias_gamma_at(double gamma, int64_t stop_step, int64_t step) {
    return (stop_step > 0 && step > stop_step) ? 0.0 : gamma;
}
