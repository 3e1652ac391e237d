#!/usr/bin/env python3
"""Driver of agent/bench/unwind.sh (see there). Prints one table of medians and ratios."""
import argparse, gzip, json, os, statistics, sys

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import run
from pprof_lite import samples

# Anchors measured on this machine in one run (2026-12-04, see issue #15): the OpenTelemetry
# eBPF profiler's in-kernel time per sampler run with full native + Python unwinding.
OTEL_US_PER_RUN = 48.0
TARGET_KERNEL_US = 15.0
TARGET_RSS_MIB = 100


def whole_share(pb, entry):
    """Share of samples whose stack reaches `entry` (the program's entry function)."""
    total = reached = 0
    for value, names in samples(gzip.open(pb).read()):
        total += value
        if entry in names:
            reached += value
    return 100.0 * reached / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--nofp", required=True)
    ap.add_argument("--python-workload", required=True)
    ap.add_argument("--pylibs", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    a = ap.parse_args()
    os.environ["PYTHONPATH"] = a.pylibs  # NumPy for the Python workload
    truth = os.path.join(a.workdir, "truth")
    py = ["/usr/bin/python3.11", a.python_workload, str(a.seconds), truth]
    workloads = {
        "C -O2 -fomit-frame-pointer": ([a.nofp, str(a.seconds), truth], "main", {}),
        "python3.11 + zlib": (py, "__libc_start_main", {"KPROF_PHASES": "compress_loop"}),
        "python3.11 + zlib + NumPy": (py, "__libc_start_main", {}),
    }
    modes = {"frame pointers only": ["--frame-pointers-only"], ".eh_frame unwinder": []}
    res = {}
    for r in range(a.rounds):
        for w, (cmd, entry, env) in workloads.items():
            os.environ.pop("KPROF_PHASES", None)
            os.environ.update(env)
            for m, flags in modes.items():
                d = os.path.join(a.workdir, f"r{r}")
                out, err, rc = run([a.agent, "record", "--hz", "199", "-d", "600s", "-o", d] + flags + ["--"] + cmd,
                                   a.workdir)
                if rc != 0:
                    raise SystemExit(f"{w} / {m} failed ({rc}): {err[-2000:]}")
                s = json.load(open(os.path.join(d, "summary.json")))
                n = s.get("native", {})
                row = dict(kernel=s["steady_bpf_us_per_sample"], agent=s["steady_agent_us_per_sample"],
                           rss=s["peak_rss_kib"] / 1024, whole=whole_share(os.path.join(d, "cpu.pb.gz"), entry),
                           tables=(n.get("table_bytes") or 0) / 1024, first=n.get("first_unwound_after_ms"),
                           compile=n.get("compile_ms"))
                res.setdefault((w, m), []).append(row)
                print(f"round {r + 1} {w} / {m}: {row}", file=sys.stderr)

    med = lambda rows, k: statistics.median(x[k] for x in rows) if all(x[k] is not None for x in rows) else None
    print(f"\nkprof native unwinding: {a.rounds} rounds of {a.seconds}s at 199 Hz, medians")
    print(f"{'workload':28} {'mode':20} {'kernel µs/sample':>17} {'agent µs/sample':>16} {'whole stacks':>13} "
          f"{'tables KiB':>11} {'first full ms':>14} {'peak RSS MiB':>13}")
    for (w, m), rows in res.items():
        first = med(rows, "first")
        first = f"{first:.0f}" if first is not None else "-"
        print(f"{w:28} {m:20} {med(rows, 'kernel'):17.2f} {med(rows, 'agent'):16.2f} {med(rows, 'whole'):12.1f}% "
              f"{med(rows, 'tables'):11.0f} {first:>14} {med(rows, 'rss'):13.1f}")
    for w in workloads:
        fp, uw = res[(w, "frame pointers only")], res[(w, ".eh_frame unwinder")]
        print(f"{w}: unwinder / frame pointers, in-kernel cost per sample: "
              f"{med(uw, 'kernel') / max(med(fp, 'kernel'), 1e-9):.2f}x; "
              f"vs the OTel profiler's {OTEL_US_PER_RUN:.0f} µs per run: {med(uw, 'kernel') / OTEL_US_PER_RUN:.2f}x")
    print("tables KiB: the unwind tables of every file the process maps (python3.11 holds libpython; "
          "NumPy brings OpenBLAS)")
    print(f"targets: in-kernel <= {TARGET_KERNEL_US:.0f} µs per sample with full unwinding of Python + libz + libc; "
          f"agent peak RSS < {TARGET_RSS_MIB} MiB")


if __name__ == "__main__":
    main()
