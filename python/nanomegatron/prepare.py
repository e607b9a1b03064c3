"""python -m nanomegatron.prepare: corpora as people ship them -> Megatron .bin/.idx, through the
library's prepare (src/data/prepare.c: the tokenizer, Megatron's document rules, atomic output).

    python -m nanomegatron.prepare --input shard-0000.parquet [more files...] --tokenizer tokenizer.json
        (--out PREFIX | --out-dir DIR) [--column text] [--json-key text] [--append-eod] [--workers N]

Inputs: what `nanomegatron prepare` reads (plain text, JSONL, .gz and .zst streams of either)
and Parquet files (FineWeb, FineWeb-Edu ship as Parquet), whose text column (--column, default
"text") is streamed row group by row group through a pipe into the library as JSONL, so memory
stays bounded by one record batch whatever the file's size. A null or non-string value is an
error naming the file, the row and the column; the outputs are then removed.

--out PREFIX writes every input, in order, into one dataset; --out-dir DIR writes one dataset per
input (DIR/NAME.bin/.idx, NAME the input's file name without its extensions), --workers of them
at a time in separate processes (many files to many shards, as Megatron's preprocess_data.py
with --partitions). With --out, --workers is the tokenizer's thread count.
"""
import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading

from . import _lib
from ._lib import ConfigError


def _is_parquet(path):
    return path.endswith(".parquet")


def _parquet_writer(path, fifo, column, key, errors):
    """Streams path's column into fifo as JSONL lines {key: value} (a thread: the library reads the
    other end). A bad value stops the stream and is recorded in errors."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        errors.append(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)")
        open(fifo, "wb").close()
        return
    with open(fifo, "wb") as out:
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            if column not in names:
                errors.append(f"{path}: no column '{column}' (columns: {', '.join(names)}); choose one with --column")
                return
            row = 0
            for batch in pf.iter_batches(batch_size=1024, columns=[column]):
                lines = []
                for value in batch.column(0).to_pylist():
                    if not isinstance(value, str):
                        what = "null" if value is None else f"a {type(value).__name__}, not a string"
                        errors.append(f"{path}: row {row}: column '{column}' is {what}")
                        return
                    lines.append(json.dumps({key: value}, ensure_ascii=False))
                    row += 1
                if lines:
                    out.write(("\n".join(lines) + "\n").encode("utf-8"))
        except BrokenPipeError:
            pass  # the library stopped reading (its own error says why)
        except Exception as e:  # a corrupt file: pyarrow's message, with the file
            errors.append(f"{path}: {type(e).__name__}: {e}")


def prepare(inputs, tokenizer, out_prefix, *, column="text", json_key="text", append_eod=False, workers=0,
            progress=0):
    """Prepares inputs (in order) into out_prefix.bin/.idx; returns the library's statistics as a
    dict. Raises ConfigError with the library's message, or one naming a bad Parquet value."""
    if not inputs:
        raise ConfigError("prepare: no input files")
    for path in inputs:
        if not os.path.exists(path):
            raise ConfigError(f"prepare: input {path}: no such file")
    errors, threads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, path in enumerate(inputs):
            if not _is_parquet(path):
                paths.append(path)
                continue
            fifo = os.path.join(tmp, f"{i}-{os.path.basename(path)}.jsonl")  # .jsonl: read as JSONL
            os.mkfifo(fifo)
            t = threading.Thread(target=_parquet_writer, args=(path, fifo, column, json_key, errors), daemon=True)
            t.start()
            threads.append(t)
            paths.append(fifo)
        arr = (ctypes.c_char_p * len(paths))(*[os.fsencode(p) for p in paths])
        opts = _lib._new(_lib.nm_prepare_opts)
        opts.inputs = ctypes.cast(arr, ctypes.POINTER(ctypes.c_char_p))
        opts.n_inputs = len(paths)
        opts.tokenizer = os.fsencode(tokenizer)
        opts.out_prefix = os.fsencode(out_prefix)
        opts.json_key = json_key.encode()
        opts.append_eod = int(bool(append_eod))
        opts.workers = int(workers)
        opts.progress = int(progress)
        stats = _lib._new(_lib.nm_prepare_stats)
        err = _lib._new(_lib.nm_error)
        rc = _lib.lib.nm_prepare_run(opts, stats, err)
        if rc != 0:  # a writer may still wait for its reader: open each pipe once to release it
            for p in paths:
                if p.startswith(tmp):
                    try:
                        os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
                    except OSError:
                        pass
        for t in threads:
            t.join(timeout=10)
    if errors:
        # the library saw a stream that ended early and wrote what it got: not the corpus
        for ext in (".bin", ".idx"):
            if os.path.exists(out_prefix + ext):
                os.remove(out_prefix + ext)
        raise ConfigError(f"prepare: {errors[0]}")
    _lib.check(rc, err, ConfigError)
    return {"bytes": stats.bytes, "docs": stats.docs, "seqs": stats.seqs, "tokens": stats.tokens,
            "seconds": stats.seconds}


def _shard_name(path):
    name = os.path.basename(path)
    for ext in (".gz", ".zst", ".parquet", ".jsonl", ".json", ".txt"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    return name


def _one_shard(args):
    path, tokenizer, out_dir, column, json_key, append_eod = args
    prefix = os.path.join(out_dir, _shard_name(path))
    return path, prefix, prepare([path], tokenizer, prefix, column=column, json_key=json_key,
                                 append_eod=append_eod, workers=1)


def prepare_shards(inputs, tokenizer, out_dir, *, column="text", json_key="text", append_eod=False, workers=1):
    """One dataset per input in out_dir, `workers` processes at a time; returns [(input, prefix,
    stats)] in input order. Two inputs with the same name are refused (their shards would
    collide)."""
    names = [_shard_name(p) for p in inputs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"prepare: --out-dir: inputs named alike would write one shard twice: {', '.join(dup)}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(p, tokenizer, out_dir, column, json_key, append_eod) for p in inputs]
    if workers <= 1 or len(jobs) == 1:
        return [_one_shard(j) for j in jobs]
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_one_shard, jobs))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nanomegatron.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json, or bytes")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="one dataset: PREFIX.bin / PREFIX.idx")
    out.add_argument("--out-dir", help="one dataset per input in DIR")
    ap.add_argument("--column", default="text", help="Parquet: the text column (default text)")
    ap.add_argument("--json-key", default="text", help="JSONL: the text field (default text)")
    ap.add_argument("--append-eod", action="store_true")
    ap.add_argument("--workers", type=int, default=0,
                    help="--out-dir: inputs prepared at once (processes); --out: tokenizer threads")
    a = ap.parse_args(argv)
    try:
        if a.out:
            st = prepare(a.input, a.tokenizer, a.out, column=a.column, json_key=a.json_key,
                         append_eod=a.append_eod, workers=a.workers, progress=-1)
            print(f"prepare: wrote {a.out}.bin/.idx: {st['docs']} documents, {st['tokens']} tokens from "
                  f"{st['bytes']} bytes in {st['seconds']:.2f} s")
        else:
            for path, prefix, st in prepare_shards(a.input, a.tokenizer, a.out_dir, column=a.column,
                                                   json_key=a.json_key, append_eod=a.append_eod,
                                                   workers=max(a.workers, 1)):
                print(f"prepare: {path} -> {prefix}.bin/.idx: {st['docs']} documents, {st['tokens']} tokens")
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
