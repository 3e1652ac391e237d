#!/usr/bin/env python3
"""kprof vs py-spy on the same Python workload, at the same rate, in one run.

Driven by agent/bench/python-vs-pyspy.sh. For each round (order rotated between rounds to
spread the noise of a shared machine), the workload agent/tests/workloads/python/split.py runs
three times: alone (baseline), under `kprof-agent record`, and under `py-spy record`. Prints
both attributions next to the truth, the workload slowdown (throughput vs baseline) and the
profiler CPU per sample, with their ratios.

CPU per sample is given twice: over the whole run (start-up included: kprof loads and verifies
its eBPF programs, py-spy attaches) and marginal, i.e. the steady cost of a continuous profiler:
one more run of each profiler with a longer workload, Δ(profiler CPU) / Δ(samples).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT = os.path.join(HERE, "..", "tests", "workloads", "python", "split.py")
TRUTH = {"recursive": 40.0, "method": 25.0, "generator": 15.0, "compress": 20.0}
# Function names as each profiler prints them.
KPROF_FN = {
    "recursive": ("split.spin_recursive",),
    "method": ("split.Shape.method_work", "split.method_work"),
    "generator": ("split.generator_work",),
    "compress": ("split.compress_work",),
}
PYSPY_FN = {
    "recursive": "spin_recursive (",
    "method": "method_work (",
    "generator": "generator_work (",
    "compress": "compress_work (",
}


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def work_of(text):
    for line in text.splitlines():
        if line.startswith("WORK "):
            _, units, secs = line.split()
            return float(units) / float(secs)
    raise RuntimeError("workload printed no WORK line:\n" + text[-2000:])


def normalise(d):
    tot = sum(d.values()) or 1.0
    return {k: 100.0 * v / tot for k, v in d.items()}


def run_baseline(py, secs):
    out = subprocess.run([py, SPLIT, str(secs)], capture_output=True, text=True, check=True).stdout
    return {"throughput": work_of(out)}


def run_kprof(agent, py, secs, hz, tmp):
    outdir = os.path.join(tmp, "kprof")
    cmd = [agent, "record", "--hz", str(hz), "--duration", f"{secs + 3}s", "-o", outdir,
           "--top", "200", "--", py, SPLIT, str(secs)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"kprof-agent failed ({p.returncode}):\n{p.stderr[-3000:]}")
    totals = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1].endswith("%"):
            try:
                totals[parts[2]] = float(parts[1].rstrip("%"))
            except ValueError:
                pass  # the header row
    attr = {c: max((totals.get(n, 0.0) for n in names), default=0.0) for c, names in KPROF_FN.items()}
    summary = json.load(open(os.path.join(outdir, "summary.json")))
    events = max(summary["events"], 1)
    cpu_s = summary["agent_cpu_s"] + summary["bpf_run_time_ns"] / 1e9
    return {
        "throughput": work_of(p.stdout),
        "attribution": normalise(attr),
        "samples": summary["events"],
        "cpu_s": cpu_s,
        "us_per_sample": 1e6 * cpu_s / events,
        "bpf_ns_per_run": summary.get("bpf_ns_per_run", 0.0),
        "rss_mib": summary["peak_rss_kib"] / 1024,
        "steady_us": summary["steady_agent_us_per_sample"] + summary["steady_bpf_us_per_sample"],
    }


def run_pyspy(pyspy, py, secs, hz, tmp):
    raw = os.path.join(tmp, "pyspy.txt")
    w = subprocess.Popen([py, SPLIT, str(secs + 1)], stdout=subprocess.PIPE, text=True)
    line = w.stdout.readline()
    assert line.startswith("READY"), line
    pid = line.split()[1]
    s = subprocess.Popen([pyspy, "record", "-r", str(hz), "-d", str(secs), "-f", "raw", "-o", raw, "-p", pid],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(s.pid, 0)  # py-spy's own CPU and peak RSS
    s.returncode = os.waitstatus_to_exitcode(status)
    s.stderr = s.stderr.read()
    spy_cpu = ru.ru_utime + ru.ru_stime
    rest = w.stdout.read()
    w.wait()
    if s.returncode != 0:
        raise RuntimeError(f"py-spy failed:\n{s.stderr[-2000:]}")
    counts = {c: 0 for c in TRUTH}
    total = 0
    for l in open(raw):
        stack, _, n = l.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        for c, needle in PYSPY_FN.items():
            if needle in stack:
                counts[c] += n
                break
    return {
        "throughput": work_of(line + rest),
        "attribution": normalise({k: float(v) for k, v in counts.items()}),
        "samples": total,
        "cpu_s": spy_cpu,
        "us_per_sample": 1e6 * spy_cpu / max(total, 1),
        "rss_mib": ru.ru_maxrss / 1024,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--pyspy", default="py-spy")
    ap.add_argument("--python", required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--hz", type=int, default=99)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    res = {"baseline": [], "kprof": [], "py-spy": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ["baseline", "kprof", "py-spy"]
            order = order[r % 3:] + order[:r % 3]
            for what in order:
                if what == "baseline":
                    res[what].append(run_baseline(a.python, a.seconds))
                elif what == "kprof":
                    res[what].append(run_kprof(a.agent, a.python, a.seconds, a.hz, tmp))
                else:
                    res[what].append(run_pyspy(a.pyspy, a.python, a.seconds, a.hz, tmp))
                print(f"  round {r + 1}/{a.rounds} {what:<8} throughput {res[what][-1]['throughput']:.0f}/s", file=sys.stderr)
        # One longer run of each profiler: the marginal (steady-state) CPU per sample.
        long_secs = 3 * a.seconds
        long = {"kprof": run_kprof(a.agent, a.python, long_secs, a.hz, tmp),
                "py-spy": run_pyspy(a.pyspy, a.python, long_secs, a.hz, tmp)}

    med = lambda k, key: statistics.median(x[key] for x in res[k])
    base = med("baseline", "throughput")
    ver = subprocess.run([a.python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True).stdout.strip()
    print(f"\nPython {ver} ({a.python}), {a.seconds}s per run, {a.hz} Hz, {a.rounds} rounds (medians)\n")
    print(f"{'category':<12}{'truth %':>9}{'kprof %':>10}{'py-spy %':>10}")
    worst = {"kprof": 0.0, "py-spy": 0.0}
    for c, t in TRUTH.items():
        vals = {k: statistics.median(x["attribution"][c] for x in res[k]) for k in worst}
        for k in worst:
            worst[k] = max(worst[k], abs(vals[k] - t))
        print(f"{c:<12}{t:>9.1f}{vals['kprof']:>10.1f}{vals['py-spy']:>10.1f}")
    print(f"{'max |err| pp':<12}{'':>9}{worst['kprof']:>10.1f}{worst['py-spy']:>10.1f}\n")
    slow = {k: 100.0 * (1 - med(k, "throughput") / base) for k in worst}
    cpu = {k: med(k, "us_per_sample") for k in worst}
    smp = {k: med(k, "samples") for k in worst}
    print(f"{'':<34}{'kprof':>10}{'py-spy':>10}{'kprof/py-spy':>14}")
    print(f"{'samples per run':<34}{smp['kprof']:>10.0f}{smp['py-spy']:>10.0f}{smp['kprof'] / max(smp['py-spy'], 1):>14.2f}")
    print(f"{'workload slowdown %':<34}{slow['kprof']:>10.1f}{slow['py-spy']:>10.1f}"
          f"{(slow['kprof'] / slow['py-spy']) if abs(slow['py-spy']) > 0.05 else float('nan'):>14.2f}")
    print(f"{'profiler CPU per sample (us)':<34}{cpu['kprof']:>10.1f}{cpu['py-spy']:>10.1f}{cpu['kprof'] / max(cpu['py-spy'], 1e-9):>14.2f}")
    marg = {}
    for k in worst:
        short = min(res[k], key=lambda x: abs(x["samples"] - smp[k]))
        dn = long[k]["samples"] - short["samples"]
        marg[k] = 1e6 * (long[k]["cpu_s"] - short["cpu_s"]) / dn if dn > 0 else float("nan")
    print(f"{'  marginal, steady state (us)':<34}{marg['kprof']:>10.1f}{marg['py-spy']:>10.1f}{marg['kprof'] / marg['py-spy'] if marg['py-spy'] > 0 else float('nan'):>14.2f}")
    print(f"{'  kprof steady state, own figure (us)':<34}{med('kprof', 'steady_us'):>10.1f}")
    print(f"{'  kprof in-kernel per run (ns)':<34}{med('kprof', 'bpf_ns_per_run'):>10.0f}")
    rss = {k: med(k, "rss_mib") for k in worst}
    print(f"{'profiler peak RSS (MiB)':<34}{rss['kprof']:>10.1f}{rss['py-spy']:>10.1f}{rss['kprof'] / max(rss['py-spy'], 1e-9):>14.2f}")
    print(f"\n(slowdown = 1 - throughput / baseline throughput; kprof CPU = agent user+sys + in-kernel "
          f"program time; py-spy CPU = its user+sys. Marginal: one run of {3 * a.seconds}s per profiler "
          "against the short run nearest the median, Δ CPU / Δ samples. py-spy pauses the process for "
          "each sample by default; kprof never stops it. py-spy samples at the rate in wall time, "
          "kprof in CPU time, so an idle or preempted workload gives py-spy more samples.)")


if __name__ == "__main__":
    main()
