// dist_comm_check.c: every operation of the communicator table against values computed
// here independently of any MPI reduction (each rank's contribution is a known function
// of its rank and the index, so the expected sums are closed forms). Runs at any world
// size: alone it checks the single-process table, under mpirun the MPI one (tests/test_dist_comm.sh).
// Also checks the byte counters against their definitions (comm.h).
#include <math.h>

#include "comm/comm.h"
#include "comm/mesh.h"
#include "../test_util.h"

static float value(int rank, int64_t i) { return (float)((rank + 1) * 1000 + (int)(i % 997)); }

int main(void) {
    nm_error err;
    nm_comm *w;
    if (nm_comm_init(&w, &err) != 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int R = w->size, me = w->rank;
    if (me == 0) printf("dist_comm_check: %d rank(s), %s\n", R, w->vt->name);

    // all_reduce: sum over ranks of value(r, i) = sum_r (r+1)*1000 + R*(i%997), exact in fp32 here
    int64_t n = 3001;
    float *buf = nm_malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) buf[i] = value(me, i);
    EXPECT(nm_comm_all_reduce(w, buf, n, NM_DT_F32, NM_RED_SUM, &err) == 0, "%s", err.msg);
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double want = 1000.0 * R * (R + 1) / 2 + (double)R * (double)(i % 997);
        if (buf[i] != (float)want) bad++;
    }
    EXPECT(bad == 0, "all_reduce: %d wrong sums", bad);
    int64_t imax = me * 7;
    EXPECT(nm_comm_all_reduce(w, &imax, 1, NM_DT_I64, NM_RED_MAX, &err) == 0, "%s", err.msg);
    EXPECT(imax == (int64_t)(R - 1) * 7, "all_reduce max %lld", (long long)imax);

    // reduce_scatter in place, uneven counts (one rank gets nothing when R > 1)
    int64_t *counts = nm_calloc((size_t)R, sizeof(int64_t));
    int64_t total = 0;
    for (int r = 0; r < R; r++) total += counts[r] = (r == 1 ? 0 : 5 + 3 * r);
    for (int64_t i = 0; i < total; i++) buf[i] = value(me, i);
    nm_comm_request req = {0};
    EXPECT(nm_comm_reduce_scatter_start(w, buf, counts, NM_DT_F32, &req, &err) == 0, "%s", err.msg);
    int done = 0;
    for (int spin = 0; spin < 1000000 && !done; spin++) EXPECT(nm_comm_test(&req, &done, &err) == 0, "%s", err.msg);
    EXPECT(nm_comm_wait(&req, &err) == 0, "%s", err.msg);
    int64_t off = 0;
    for (int r = 0; r < me; r++) off += counts[r];
    bad = 0;
    for (int64_t i = off; i < off + counts[me]; i++) {
        double want = 1000.0 * R * (R + 1) / 2 + (double)R * (double)(i % 997);
        if (buf[i] != (float)want) bad++;
    }
    EXPECT(bad == 0, "reduce_scatter: %d wrong values in rank %d's piece", bad, me);

    // all_gather in place: piece r holds value(r, i)
    for (int64_t i = 0; i < total; i++) buf[i] = -1.0f;
    for (int64_t i = off; i < off + counts[me]; i++) buf[i] = value(me, i);
    EXPECT(nm_comm_all_gather(w, buf, counts, NM_DT_F32, &err) == 0, "%s", err.msg);
    bad = 0;
    int64_t at = 0;
    for (int r = 0; r < R; r++) {
        for (int64_t i = at; i < at + counts[r]; i++) bad += buf[i] != value(r, i);
        at += counts[r];
    }
    EXPECT(bad == 0, "all_gather: %d wrong values", bad);

    // all_to_all with per-rank counts: rank s sends (s + d) % 3 + 1 ints to rank d, valued s*100+d
    int64_t *sc = nm_calloc((size_t)R, sizeof(int64_t)), *rcv = nm_calloc((size_t)R, sizeof(int64_t));
    int64_t ns = 0, nr = 0;
    for (int d = 0; d < R; d++) ns += sc[d] = (me + d) % 3 + 1;
    for (int s = 0; s < R; s++) nr += rcv[s] = (s + me) % 3 + 1;
    int32_t *sb = nm_malloc((size_t)ns * sizeof(int32_t)), *rb = nm_malloc((size_t)nr * sizeof(int32_t));
    at = 0;
    for (int d = 0; d < R; d++)
        for (int64_t k = 0; k < sc[d]; k++) sb[at++] = me * 100 + d;
    EXPECT(nm_comm_all_to_all(w, sb, sc, rb, rcv, NM_DT_I32, &err) == 0, "%s", err.msg);
    bad = 0;
    at = 0;
    for (int s = 0; s < R; s++)
        for (int64_t k = 0; k < rcv[s]; k++) bad += rb[at++] != s * 100 + me;
    EXPECT(bad == 0, "all_to_all: %d wrong values", bad);
    int64_t a2a_bytes = ns * 4;  // everything handed to the exchange, own piece included
    EXPECT(w->counters.bytes[NM_COMM_ALL_TO_ALL] == a2a_bytes, "all_to_all counted %lld bytes, sent %lld",
           (long long)w->counters.bytes[NM_COMM_ALL_TO_ALL], (long long)a2a_bytes);
    EXPECT(w->counters.bytes[NM_COMM_REDUCE_SCATTER] == total * 4, "reduce_scatter counted %lld, bucket %lld",
           (long long)w->counters.bytes[NM_COMM_REDUCE_SCATTER], (long long)(total * 4));
    EXPECT(w->counters.bytes[NM_COMM_ALL_REDUCE] == n * 4 + 8, "all_reduce counted %lld",
           (long long)w->counters.bytes[NM_COMM_ALL_REDUCE]);

    // broadcast from the last rank; bf16 moves as raw 16-bit words
    uint16_t words[4] = {0, 0, 0, 0};
    if (me == R - 1) words[0] = 0x3f80, words[1] = 0x4000, words[2] = 0xc000, words[3] = (uint16_t)R;
    EXPECT(nm_comm_broadcast(w, words, 4, NM_DT_BF16, R - 1, &err) == 0, "%s", err.msg);
    EXPECT(words[0] == 0x3f80 && words[2] == 0xc000 && words[3] == R, "broadcast got %x %x", words[0], words[3]);

    // send / recv around a ring
    if (R > 1) {
        double token = me * 2.5;
        double got = -1.0;
        if (me % 2 == 0) {
            EXPECT(nm_comm_send(w, &token, 1, NM_DT_F64, (me + 1) % R, 7, &err) == 0, "%s", err.msg);
            EXPECT(nm_comm_recv(w, &got, 1, NM_DT_F64, (me + R - 1) % R, 7, &err) == 0, "%s", err.msg);
        } else {
            EXPECT(nm_comm_recv(w, &got, 1, NM_DT_F64, (me + R - 1) % R, 7, &err) == 0, "%s", err.msg);
            EXPECT(nm_comm_send(w, &token, 1, NM_DT_F64, (me + 1) % R, 7, &err) == 0, "%s", err.msg);
        }
        EXPECT(got == ((me + R - 1) % R) * 2.5, "ring recv %g", got);
    } else {
        EXPECT(nm_comm_send(w, buf, 1, NM_DT_F32, 0, 0, &err) != 0, "send in a 1-rank group must fail");
    }

    // the mesh: every layout of this world size; group sizes and ranks agree with the coordinates
    for (int64_t ep = 1; ep <= R; ep++) {
        nm_mesh_sizes ms;
        if (nm_mesh_check(&ms, R, 1, 1, ep, 8, 8 * R, 1, &err) != 0) continue;
        nm_mesh *mesh;
        EXPECT(nm_mesh_create(&mesh, w, &ms, &err) == 0, "%s", err.msg);
        EXPECT(mesh->dp->size == R && mesh->ep->size == ep && mesh->edp->size == R / ep, "group sizes dp %d ep %d edp %d",
               mesh->dp->size, mesh->ep->size, mesh->edp->size);
        EXPECT(mesh->ep->rank == me % ep && mesh->edp->rank == me / ep, "ep rank %d edp rank %d", mesh->ep->rank,
               mesh->edp->rank);
        // the ep group is consecutive ranks: the sum of world ranks in it is known
        int64_t s = me;
        EXPECT(nm_comm_all_reduce(mesh->ep, &s, 1, NM_DT_I64, NM_RED_SUM, &err) == 0, "%s", err.msg);
        int64_t base = (me / ep) * ep;
        EXPECT(s == ep * base + ep * (ep - 1) / 2, "ep group of rank %d sums ranks to %lld", me, (long long)s);
        nm_mesh_destroy(mesh);
    }
    nm_mesh_sizes ms;
    EXPECT(nm_mesh_check(&ms, 6, 1, 4, 1, 8, 8, 1, &err) != 0 && strstr(err.msg, "6"), "world 6 / pp 4 refused: %s",
           err.msg);
    EXPECT(nm_mesh_check(&ms, 4, 1, 1, 3, 9, 8, 1, &err) != 0 && strstr(err.msg, "expert_parallel_size 3"),
           "ep 3 refused: %s", err.msg);
    EXPECT(nm_mesh_check(&ms, 4, 1, 1, 4, 6, 8, 1, &err) != 0 && strstr(err.msg, "6 routed experts"),
           "ep 4 with 6 experts refused: %s", err.msg);
    EXPECT(nm_mesh_check(&ms, 4, 1, 1, 1, 8, 6, 1, &err) != 0 && strstr(err.msg, "global_batch 6"),
           "global batch 6 at dp4 refused: %s", err.msg);
    EXPECT(nm_mesh_check(&ms, 8, 2, 2, 4, 8, 8, 1, &err) == 0 && ms.dp == 2 && ms.edp == 1, "8 = tp2 pp2 dp2, ep4: %s",
           err.msg);

    nm_free(buf);
    nm_free(counts);
    nm_free(sc);
    nm_free(rcv);
    nm_free(sb);
    nm_free(rb);
    int all_fail = failures;
    nm_comm_all_reduce(w, &all_fail, 1, NM_DT_I32, NM_RED_SUM, &err);
    if (me == 0) printf("dist_comm_check: %s\n", all_fail ? "FAILED" : "ok");
    nm_comm_destroy(w);
    return all_fail != 0;
}
