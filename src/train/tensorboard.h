// tensorboard.h: a TensorBoard event-file writer for scalars (formats.md 5).
//
// Writes <logdir>/events.out.tfevents.<%010d secs>.<host>.<pid>: TFRecord framing (u64 length,
// masked CRC32C of the length, payload, masked CRC32C of the payload) around hand-encoded
// Event protobufs: the first record is {wall_time, file_version "brain.Event:2"}, then one
// Event {wall_time, step, summary{value{tag, simple_value}...}} per call.
//
// Deliberately not supported: histograms, images, graphs, reading. Records are only ever
// appended whole (formats.md 5.6: a torn length CRC is fatal to TensorBoard's reader), and
// a new file is started per process (restart = new file; steps stay consistent).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "core/check.h"

typedef struct nm_tb_writer nm_tb_writer;

// One Event. Exactly one of file_version / (n_values > 0) is normally used.
typedef struct nm_tb_event {
    double wall_time;           // seconds since the epoch
    int64_t step;               // omitted from the wire when 0 (proto3 default)
    const char *file_version;   // e.g. "brain.Event:2", or NULL
    int n_values;               // scalars in the summary (0: no summary)
    const char *const *tags;    // (n_values) UTF-8 tags
    const float *values;        // (n_values) simple_value (f32 on the wire)
} nm_tb_event;

// Encodes ev as one complete TFRecord (framing included) into out. Returns the number of
// bytes the record needs; writes them only if that is <= cap (call with cap 0 to size).
size_t nm_tb_encode_record(uint8_t *out, size_t cap, const nm_tb_event *ev);

// The masked CRC32C of formats.md 5.2.
uint32_t nm_tb_masked_crc32c(const void *data, size_t size);

// Creates logdir (mkdir -p) and the event file, and writes the file_version record.
// wall_time < 0 means "now". Returns 0, or -1 with err naming the path.
int nm_tb_open(nm_tb_writer **out, const char *logdir, double wall_time, nm_error *err);

// Appends one Event with n scalars at `step` (wall time now). Buffered: call nm_tb_flush
// at log steps so TensorBoard sees them.
int nm_tb_add_scalars(nm_tb_writer *w, int64_t step, const char *const *tags, const float *values, int n,
                      nm_error *err);
int nm_tb_add_scalar(nm_tb_writer *w, const char *tag, int64_t step, float value, nm_error *err);
// Appends an arbitrary event (tests, fixed wall times).
int nm_tb_write_event(nm_tb_writer *w, const nm_tb_event *ev, nm_error *err);

int nm_tb_flush(nm_tb_writer *w, nm_error *err);
const char *nm_tb_path(const nm_tb_writer *w);
// Flushes and closes; NULL-safe.
void nm_tb_close(nm_tb_writer *w);
