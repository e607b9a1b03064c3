// test_pipeline_schedule.c: the pipeline schedules (train/pipeline.h), run as a simulation of
// every rank over many shapes, without a model or MPI.
//
//  1. Each rank's list holds every (chunk, micro-batch) forward and backward exactly once, the
//     forward first; each chunk's backwards run in micro-batch order (the order one process
//     adds gradients in, so v changes no sum).
//  2. No deadlock: ranks run their lists in order, a forward waiting for the previous stage's
//     forward of the same micro-batch and a backward for the next stage's backward (receives
//     block, sends do not, as nm_pipeline_train runs them); the simulation must finish.
//  3. The activation sets: nm_pipeline_slots is the most micro-batches of one chunk in flight,
//     min(PP - rank, m) for 1F1B (the memory the planner promised before virtual stages).
//  5. Paired micro-batches in 1F1B (check_paired): no deadlock, at most w sets on either model.
//  4. The bubble: with a forward costing 1 and a backward 2 per chunk (1/v of a stage's layers
//     each), the simulated step is (v m + PP - 1) slots of 3/v exactly, so the idle fraction is
//     (PP - 1)/(v m + PP - 1), and interleaving (v = 2, 3) lowers it below 1F1B's at the same m.
#include <math.h>
#include <stdio.h>

#include "test_util.h"
#include "train/pipeline.h"

#define MAX_RANKS 8
#define MAX_V 4
#define MAX_M 32

typedef struct sim {
    int64_t pp, v, m;
    nm_pipeline_action *plan[MAX_RANKS];
    int64_t next[MAX_RANKS];                  // index of each rank's next action
    double clock[MAX_RANKS];
    double done_f[MAX_RANKS * MAX_V][MAX_M];  // finish time by virtual stage and micro-batch, -1: not yet
    double done_b[MAX_RANKS * MAX_V][MAX_M];
} sim;

// Runs every rank to the end; returns the step's time, or -1 on a deadlock.
static double simulate(sim *s, double t_f, double t_b) {
    const int64_t n = 2 * s->v * s->m, last = s->pp * s->v - 1;
    for (int64_t j = 0; j <= last; j++)
        for (int64_t i = 0; i < s->m; i++) s->done_f[j][i] = s->done_b[j][i] = -1;
    for (int64_t r = 0; r < s->pp; r++) s->next[r] = 0, s->clock[r] = 0;
    for (;;) {
        int progressed = 0, finished = 1;
        for (int64_t r = 0; r < s->pp; r++) {
            while (s->next[r] < n) {
                nm_pipeline_action a = s->plan[r][s->next[r]];
                int64_t j = a.chunk * s->pp + r;  // virtual stage
                double ready;
                if (!a.backward) ready = j == 0 ? 0 : s->done_f[j - 1][a.micro];
                else ready = j == last ? 0 : s->done_b[j + 1][a.micro];
                if (ready < 0) break;  // blocked in a receive
                double start = fmax(s->clock[r], ready);
                s->clock[r] = start + (a.backward ? t_b : t_f);
                (a.backward ? s->done_b : s->done_f)[j][a.micro] = s->clock[r];
                s->next[r]++;
                progressed = 1;
            }
            if (s->next[r] < n) finished = 0;
        }
        if (finished) break;
        if (!progressed) return -1;
    }
    double end = 0;
    for (int64_t r = 0; r < s->pp; r++) end = fmax(end, s->clock[r]);
    return end;
}

static void check_lists(sim *s) {
    const int64_t n = 2 * s->v * s->m;
    for (int64_t r = 0; r < s->pp; r++) {
        int seen_f[MAX_V][MAX_M] = {{0}}, seen_b[MAX_V][MAX_M] = {{0}};
        int64_t last_b[MAX_V];
        for (int64_t c = 0; c < s->v; c++) last_b[c] = -1;
        for (int64_t k = 0; k < n; k++) {
            nm_pipeline_action a = s->plan[r][k];
            if (a.chunk < 0 || a.chunk >= s->v || a.micro < 0 || a.micro >= s->m) {
                EXPECT(0, "pp %lld v %lld m %lld rank %lld: action %lld out of range", (long long)s->pp,
                       (long long)s->v, (long long)s->m, (long long)r, (long long)k);
                return;
            }
            if (a.backward) {
                EXPECT(seen_f[a.chunk][a.micro] == 1, "pp %lld v %lld m %lld rank %lld: backward of chunk %lld "
                       "micro %lld before its forward", (long long)s->pp, (long long)s->v, (long long)s->m,
                       (long long)r, (long long)a.chunk, (long long)a.micro);
                EXPECT(a.micro == last_b[a.chunk] + 1, "pp %lld v %lld m %lld rank %lld: chunk %lld backward of "
                       "micro %lld after %lld", (long long)s->pp, (long long)s->v, (long long)s->m, (long long)r,
                       (long long)a.chunk, (long long)a.micro, (long long)last_b[a.chunk]);
                last_b[a.chunk] = a.micro;
                seen_b[a.chunk][a.micro]++;
            } else {
                seen_f[a.chunk][a.micro]++;
            }
        }
        for (int64_t c = 0; c < s->v; c++)
            for (int64_t i = 0; i < s->m; i++)
                EXPECT(seen_f[c][i] == 1 && seen_b[c][i] == 1, "pp %lld v %lld m %lld rank %lld: chunk %lld micro "
                       "%lld run %d / %d times", (long long)s->pp, (long long)s->v, (long long)s->m, (long long)r,
                       (long long)c, (long long)i, seen_f[c][i], seen_b[c][i]);
    }
}

static double run_shape(int64_t pp, int64_t v, int64_t m) {
    static sim s;
    s.pp = pp, s.v = v, s.m = m;
    for (int64_t r = 0; r < pp; r++) {
        s.plan[r] = nm_malloc((size_t)(2 * v * m) * sizeof(nm_pipeline_action));
        nm_pipeline_schedule(s.plan[r], pp, v, r, m);
    }
    check_lists(&s);
    // a stage's forward costs 1 and its backward 2; a chunk holds 1/v of it
    double t = simulate(&s, 1.0 / (double)v, 2.0 / (double)v);
    EXPECT(t >= 0, "pp %lld v %lld m %lld: the schedule deadlocks", (long long)pp, (long long)v, (long long)m);
    for (int64_t r = 0; r < pp; r++) {
        int64_t slots = nm_pipeline_slots(pp, v, r, m);
        if (v == 1) {
            int64_t want = pp - r < m ? pp - r : m;
            EXPECT(slots == want, "pp %lld m %lld rank %lld: %lld slots, 1F1B needs %lld", (long long)pp, (long long)m,
                   (long long)r, (long long)slots, (long long)want);
        }
        EXPECT(slots >= 1 && slots <= m, "pp %lld v %lld m %lld rank %lld: %lld slots", (long long)pp, (long long)v,
               (long long)m, (long long)r, (long long)slots);
        nm_free(s.plan[r]);
    }
    return t;
}

// Paired micro-batches in 1F1B (pipeline.c, train_paired): rank r runs w = min(PP - r, m)
// warm-up forwards, then micro-batch i + w's forward and i's backward as one step (both inputs
// received before it, both outputs sent after it), then the remaining backwards. It must not
// deadlock, and micro-batches in blocks of w alternating between two models must never hold more
// than w on one model, nor pair a forward with a backward on the same model. Returns the pairs run.
static int64_t check_paired(int64_t pp, int64_t m) {
    double done_f[MAX_RANKS][MAX_M], done_b[MAX_RANKS][MAX_M], clock[MAX_RANKS] = {0};
    int64_t step[MAX_RANKS] = {0}, w[MAX_RANKS], live[MAX_RANKS][2] = {{0}}, pairs = 0;
    for (int64_t r = 0; r < pp; r++) {
        w[r] = nm_pipeline_pair_slots(pp, r, m);
        EXPECT(w[r] >= 1 && w[r] <= m, "pp %lld m %lld rank %lld: w %lld", (long long)pp, (long long)m, (long long)r,
               (long long)w[r]);
        for (int64_t i = 0; i < m; i++) done_f[r][i] = done_b[r][i] = -1;
    }
    for (;;) {
        int progressed = 0, finished = 1;
        for (int64_t r = 0; r < pp; r++) {
            const int64_t W = w[r], n_pairs = m - W, n_steps = W + n_pairs + W;  // warm-up, pairs, cool-down
            while (step[r] < n_steps) {
                int64_t k = step[r], f = -1, b = -1;
                if (k < W) f = k;
                else if (k < W + n_pairs) f = k, b = k - W;
                else b = k - W;  // cool-down: backwards m - W .. m - 1
                double ready = clock[r];
                if (f >= 0) ready = r == 0 ? ready : (done_f[r - 1][f] < 0 ? -1 : fmax(ready, done_f[r - 1][f]));
                if (ready >= 0 && b >= 0)
                    ready = r == pp - 1 ? ready : (done_b[r + 1][b] < 0 ? -1 : fmax(ready, done_b[r + 1][b]));
                if (ready < 0) break;  // blocked in a receive
                if (f >= 0 && b >= 0) {
                    EXPECT((f / W) % 2 != (b / W) % 2, "pp %lld m %lld rank %lld: micro-batches %lld and %lld paired "
                           "on one model", (long long)pp, (long long)m, (long long)r, (long long)f, (long long)b);
                    pairs++;
                }
                clock[r] = ready + (f >= 0 ? 1.0 : 0.0) + (b >= 0 ? 2.0 : 0.0);
                if (f >= 0) done_f[r][f] = clock[r], live[r][(f / W) % 2]++;
                if (b >= 0) {
                    EXPECT(done_f[r][b] >= 0, "pp %lld m %lld rank %lld: backward of %lld before its forward",
                           (long long)pp, (long long)m, (long long)r, (long long)b);
                    done_b[r][b] = clock[r];
                }
                for (int k2 = 0; k2 < 2; k2++)
                    EXPECT(live[r][k2] <= W, "pp %lld m %lld rank %lld: %lld micro-batches on model %d, %lld sets",
                           (long long)pp, (long long)m, (long long)r, (long long)live[r][k2], k2, (long long)W);
                if (b >= 0) live[r][(b / W) % 2]--;
                step[r]++;
                progressed = 1;
            }
            if (step[r] < w[r] + (m - w[r]) + w[r]) finished = 0;
        }
        if (finished) break;
        if (!progressed) {
            EXPECT(0, "pp %lld m %lld: the paired schedule deadlocks", (long long)pp, (long long)m);
            break;
        }
    }
    for (int64_t r = 0; r < pp; r++)
        for (int64_t i = 0; i < m; i++)
            EXPECT(done_f[r][i] >= 0 && done_b[r][i] >= 0, "pp %lld m %lld rank %lld: micro %lld not run",
                   (long long)pp, (long long)m, (long long)r, (long long)i);
    return pairs;
}

int main(void) {
    int shapes = 0;
    int64_t pairs = 0;
    for (int64_t pp = 2; pp <= MAX_RANKS; pp++)
        for (int64_t m = 1; m <= MAX_M; m++) pairs += check_paired(pp, m), shapes++;
    EXPECT(pairs > 0, "no shape paired anything");
    for (int64_t pp = 2; pp <= MAX_RANKS; pp++) {
        for (int64_t mult = 1; mult * pp <= MAX_M; mult++) {
            int64_t m = mult * pp;
            double t1 = run_shape(pp, 1, m);
            double bubble1 = 1.0 - 3.0 * (double)m / t1;
            EXPECT(fabs(bubble1 - (double)(pp - 1) / (double)(m + pp - 1)) < 1e-12,
                   "pp %lld m %lld: 1F1B idle fraction %.6f, formula %.6f", (long long)pp, (long long)m, bubble1,
                   (double)(pp - 1) / (double)(m + pp - 1));
            shapes++;
            for (int64_t v = 2; v <= MAX_V; v++) {
                double t = run_shape(pp, v, m);
                double bubble = 1.0 - 3.0 * (double)m / t;
                double want = (double)(pp - 1) / (double)(v * m + pp - 1);
                EXPECT(fabs(bubble - want) < 1e-12, "pp %lld v %lld m %lld: idle fraction %.6f, formula %.6f",
                       (long long)pp, (long long)v, (long long)m, bubble, want);
                EXPECT(bubble < bubble1, "pp %lld v %lld m %lld: interleaved idle %.4f not below 1F1B's %.4f",
                       (long long)pp, (long long)v, (long long)m, bubble, bubble1);
                shapes++;
            }
        }
        // 1F1B also takes any m, fewer micro-batches than stages included
        for (int64_t m = 1; m < pp; m++) run_shape(pp, 1, m), shapes++;
    }
    nm_error err;
    EXPECT(nm_pipeline_check_micro_batches(4, 2, 6, &err) != 0 && strstr(err.msg, "multiple of it"), "m 6 on pp 4: %s",
           err.msg);
    EXPECT(nm_pipeline_check_micro_batches(4, 1, 6, &err) == 0, "1F1B takes any m");
    if (failures) {
        fprintf(stderr, "test_pipeline_schedule: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_pipeline_schedule: %d shapes, ok\n", shapes);
    return 0;
}
