#!/usr/bin/env python3
"""Durable 8 KiB writes into a preallocated file, three ways, alone and with a second process
doing the same on the same disk (as the primary and the standby do in `apiary bench`).

Then the direct write twice more, each time after a buffered write to a neighbouring file in
the same directory (as SQLite writes its WAL beside the replication log), once without and once
with an fstat of that neighbour before each write (as the capture did until it tracked the WAL's
end itself). On Linux 6.13+ the fstat makes the neighbour's next write stamp a fine-grained
mtime, and on ext4 without a journal the durable write then also writes the inode table block
the two files share: one more synchronous I/O.

Usage: bench/durable-write.py [DIR]   (DIR on the disk to measure; default: the current one)
"""
import mmap, os, subprocess, sys, time

N = 3000
BLOCK = 8192

def prepare(path):
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    os.write(fd, b"\0" * (64 << 20))
    os.fsync(fd)
    os.close(fd)

def measure(name, op):
    samples = []
    for i in range(N):
        t = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t)
    samples.sort()
    print(f"{name}: p50 {samples[N // 2] * 1e6:.0f} us  p99 {samples[int(N * .99)] * 1e6:.0f} us", flush=True)

def run(directory, tag):
    data = b"x" * BLOCK
    path = os.path.join(directory, f".durable-write-{tag}")
    prepare(path)
    fd = os.open(path, os.O_RDWR)
    measure(f"{tag} pwrite + fdatasync        ", lambda i: (os.pwrite(fd, data, i * BLOCK), os.fdatasync(fd)))
    os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_DSYNC)
    measure(f"{tag} pwrite, O_DSYNC           ", lambda i: os.pwrite(fd, data, i * BLOCK))
    os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    aligned = mmap.mmap(-1, BLOCK)
    aligned.write(data)
    measure(f"{tag} pwrite, O_DIRECT | O_DSYNC", lambda i: os.pwritev(fd, [aligned], i * BLOCK))
    neighbour_path = os.path.join(directory, f".durable-write-{tag}-neighbour")
    neighbour = os.open(neighbour_path, os.O_CREAT | os.O_RDWR)
    page = b"w" * 4096
    measure(f"{tag}   after a neighbour's write   ", lambda i: (os.pwrite(neighbour, page, (i % 64) * 4096), os.pwritev(fd, [aligned], i * BLOCK)))
    measure(f"{tag}   ... and its fstat           ", lambda i: (os.pwrite(neighbour, page, (i % 64) * 4096), os.fstat(neighbour), os.pwritev(fd, [aligned], i * BLOCK)))
    os.close(neighbour)
    os.remove(neighbour_path)
    os.close(fd)
    os.remove(path)

if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else "."
    if len(sys.argv) > 2:
        run(directory, sys.argv[2])
        sys.exit(0)
    run(directory, "alone")
    other = subprocess.Popen([sys.executable, __file__, directory, "pair-b"])
    run(directory, "pair-a")
    other.wait()
