// comm_bw.c: the bandwidth and latency `plan`'s time model takes (--bw-intra, --latency-intra),
// measured on this machine's MPI: an all-reduce of a large buffer (the ring's bus bandwidth per
// rank, 2 (n-1)/n x bytes / time, the best of several) and the one-way time of an 8-byte
// message between ranks 0 and 1 (half the best round trip). bench/timemodel.sh builds and runs
// it; by hand: mpicc -O2 bench/comm_bw.c -o comm_bw && mpirun -np 2 ./comm_bw [MiB]
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    const size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 64;
    const size_t count = mib * 1048576 / sizeof(float);
    float *buf = malloc(count * sizeof(float));
    if (!buf) {
        fprintf(stderr, "comm_bw: out of memory for %zu MiB\n", mib);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (size_t i = 0; i < count; i++) buf[i] = (float)(i % 7);
    double best = 1e30;
    for (int r = 0; r < 6; r++) {  // the first is a warm-up (pages, shared-memory segments)
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double dt = MPI_Wtime() - t0;
        MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (r > 0 && dt < best) best = dt;
    }
    double bus = n > 1 ? 2.0 * (n - 1) / n * (double)(count * sizeof(float)) / best : 0.0;
    double lat = 1e30;
    char byte[8] = {0};
    for (int r = 0; r < 200 && n > 1; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        if (rank == 0) {
            MPI_Send(byte, 8, MPI_CHAR, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(byte, 8, MPI_CHAR, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(byte, 8, MPI_CHAR, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(byte, 8, MPI_CHAR, 0, 0, MPI_COMM_WORLD);
        }
        double dt = (MPI_Wtime() - t0) / 2.0;
        if (dt < lat) lat = dt;
    }
    if (rank == 0)
        printf("{\"ranks\": %d, \"mib\": %zu, \"bus_gbps\": %.4f, \"latency_us\": %.3f}\n", n, mib, bus / 1e9,
               n > 1 ? lat * 1e6 : 0.0);
    free(buf);
    MPI_Finalize();
    return 0;
}
