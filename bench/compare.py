#!/usr/bin/env python3
"""Apiary against PostgreSQL, side by side, in rounds: the issue's benchmark goal, measured.

Each round runs `apiary bench` (replicated and single) and then
bench/postgres-sync-replication.sh with the same client counts and duration, back to back on
this machine. Every round's lines are printed as they come; at the end, the median of the
rounds for each setup and client count, and the goal's two ratios per round and for the
medians:

  32 clients: apiary-replicated tps / postgres-sync tps   (goal >= 1.5)
  1 client:   apiary-replicated p50 / postgres-sync p50   (goal <= 1.3)

Why rounds: on a small shared VM one run's figures move by 10-20% (the disk's flush latency
and the scheduling of ~8 busy threads on 2 cores), more than the differences being measured.
The median of rounds run alternately is steadier, and every round stays in the output.

usage: bench/compare.py [--rounds 3] [--seconds 10] [--clients 1,8,32,64] [--apiary PATH]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(apiary-replicated|apiary-single|postgres-sync) clients=(\d+) tps=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+)")
CPU = re.compile(r"cpu_us_per_insert=(\S+)")


def run(command):
    """Runs `command`, echoing its stdout, and returns the figure lines it printed."""
    print("$ " + " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    figures = []
    for line in process.stdout:
        print(line, end="", flush=True)
        match = LINE.match(line)
        if match:
            setup, clients, tps, p50, p99 = match.groups()
            cpu = CPU.search(line)
            # Apiary's lines also say each process's CPU time per insert (µs): their sum.
            parts = cpu.group(1).split(",") if cpu else []
            values = [float(p.split(":")[1]) for p in parts if p.split(":")[-1].replace(".", "", 1).isdigit()]
            total = sum(values) if values and len(values) == len(parts) else None
            figures.append((setup, int(clients), float(tps), float(p50), float(p99), total))
    if process.wait() != 0:
        sys.exit(f"compare: {command[0]} failed with status {process.returncode}")
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--apiary", default=os.path.join(ROOT, ".build/release/apiary"))
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        sys.exit("compare: --rounds and --seconds must be at least 1")
    clients = [int(c) for c in args.clients.split(",")]
    if not os.access(args.apiary, os.X_OK):
        sys.exit(f"compare: no apiary binary at {args.apiary}; run: swift build -c release --product apiary")

    rounds = []
    for number in range(1, args.rounds + 1):
        print(f"# round {number} of {args.rounds}", flush=True)
        figures = run([args.apiary, "bench", "--clients", args.clients, "--seconds", str(args.seconds)])
        figures += run([os.path.join(ROOT, "bench/postgres-sync-replication.sh"),
                        "--clients", " ".join(map(str, clients)), "--seconds", str(args.seconds)])
        rounds.append({(setup, n): (tps, p50, p99, cpu) for setup, n, tps, p50, p99, cpu in figures})

    print(f"\n# median of {args.rounds} round(s), {args.seconds} s per client count")
    print("| clients | setup | tps | p50 ms | p99 ms | CPU µs per insert (all processes) |")
    print("|---:|---|---:|---:|---:|---:|")
    medians = {}
    for n in clients:
        for setup in ("apiary-replicated", "apiary-single", "postgres-sync"):
            values = [r[(setup, n)] for r in rounds if (setup, n) in r]
            if not values:
                continue
            median = tuple(statistics.median(v[i] for v in values) for i in range(3))
            cpus = [v[3] for v in values if v[3] is not None]
            medians[(setup, n)] = median
            cpu = f"{statistics.median(cpus):.1f}" if cpus else "n/a"
            print(f"| {n} | {setup} | {median[0]:.1f} | {median[1]:.3f} | {median[2]:.3f} | {cpu} |")

    def ratios(figures):
        throughput = latency = None
        if ("apiary-replicated", 32) in figures and ("postgres-sync", 32) in figures:
            throughput = figures[("apiary-replicated", 32)][0] / figures[("postgres-sync", 32)][0]
        if ("apiary-replicated", 1) in figures and ("postgres-sync", 1) in figures:
            latency = figures[("apiary-replicated", 1)][1] / figures[("postgres-sync", 1)][1]
        return throughput, latency

    def shown(value, goal, met):
        if value is None:
            return "n/a"
        return f"{value:.2f}x ({'meets' if met(value) else 'misses'} {goal})"

    print("\n# the goal: 32-client tps ratio >= 1.5, 1-client p50 ratio <= 1.3")
    for label, figures in [(f"round {i + 1}", r) for i, r in enumerate(rounds)] + [("median", medians)]:
        throughput, latency = ratios(figures)
        print(f"{label}: 32 clients {shown(throughput, '>= 1.5', lambda v: v >= 1.5)}; "
              f"1 client p50 {shown(latency, '<= 1.3', lambda v: v <= 1.3)}")


if __name__ == "__main__":
    main()
