#!/usr/bin/env python3
"""Driver of agent/bench/overhead.sh (see there). Prints one table of medians and ratios."""
import argparse, json, os, re, statistics, subprocess, sys, time


def run(cmd, workdir):
    """Runs cmd; returns (stdout, stderr, returncode, cpu seconds and peak RSS KiB of the process
    tree it waited for — wait4 gives per-child figures)."""
    out_path, err_path = os.path.join(workdir, "out.txt"), os.path.join(workdir, "err.txt")
    with open(out_path, "w") as o, open(err_path, "w") as e:
        p = subprocess.Popen(cmd, stdout=o, stderr=e)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return (open(out_path).read(), open(err_path).read(), p.returncode,
            ru.ru_utime + ru.ru_stime, ru.ru_maxrss)


def parse_workload(out):
    m = re.search(r"wall_s=([\d.]+) cpu_s=([\d.]+)", out)
    if not m:
        raise SystemExit(f"workload output not understood: {out!r}")
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--perf", default="perf")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=int, default=1000)
    a = ap.parse_args()
    wl = [a.workload, "-n", str(a.work)]
    modes = ["none", "perf", "kprof"]
    res = {m: [] for m in modes}
    per_run = []
    steady_runs = []
    for r in range(a.rounds):
        order = modes[r % 3:] + modes[: r % 3]  # rotate so no mode always runs first
        for m in order:
            if m == "none":
                out, err, rc, tree_cpu, maxrss = run(wl, a.workdir)
                samples, prof_rss, bpf_ns, loop = 0, 0, 0, 0.0
            elif m == "perf":
                data = os.path.join(a.workdir, "perf.data")
                out, err, rc, tree_cpu, maxrss = run([a.perf, "record", "-F", "99", "-g", "-o", data, "--"] + wl, a.workdir)
                s = re.search(r"\((\d+) samples\)", err)
                samples = int(s.group(1)) if s else 0
                bpf_ns, prof_rss, loop = 0, None, 0.0
            else:
                d = os.path.join(a.workdir, f"kprof-{r}")
                out, err, rc, tree_cpu, maxrss = run([a.agent, "record", "--no-python", "--hz", "99", "-d", "600s", "-o", d, "--"] + wl, a.workdir)
                if rc != 0:
                    raise SystemExit(f"kprof-agent failed: {err}")
                summ = json.load(open(os.path.join(d, "summary.json")))
                samples, prof_rss, bpf_ns = summ["events"], summ["peak_rss_kib"], summ["bpf_run_time_ns"]
                loop = summ["loop_cpu_s"]
                steady_runs.append((summ["steady_agent_us_per_sample"], summ["steady_bpf_us_per_sample"]))
                per_run.append(summ["bpf_ns_per_run"])
                out = out.split("SELF%")[0] if "SELF%" in out else out
            if rc != 0:
                raise SystemExit(f"{m} failed ({rc}): {err}")
            w_wall, w_cpu = parse_workload(out)
            prof_cpu = max(0.0, tree_cpu - w_cpu) if m != "none" else 0.0
            if m == "perf":
                prof_rss = maxrss  # max over children so far: perf dominates the workload's ~1 MiB
            res[m].append(dict(wall=w_wall, cpu=w_cpu, samples=samples, prof_cpu=prof_cpu,
                               bpf_ns=bpf_ns, rss_kib=prof_rss or 0, loop=loop))
            print(f"round {r+1} {m:5}: workload wall {w_wall:.3f}s cpu {w_cpu:.3f}s samples {samples} "
                  f"profiler cpu {prof_cpu:.3f}s bpf {bpf_ns/1e6:.1f}ms", file=sys.stderr)

    med = lambda m, k: statistics.median(x[k] for x in res[m])
    base_wall, base_cpu = med("none", "wall"), med("none", "cpu")
    print(f"\nkprof overhead benchmark: {a.rounds} rounds, work {a.work}, 99 Hz, medians")
    print(f"{'mode':6} {'wall s':>8} {'slowdown':>9} {'cpu s':>8} {'cpu ratio':>9} {'samples':>8} "
          f"{'prof µs/sample':>15} {'of which eBPF':>14} {'peak RSS MiB':>13}")
    for m in modes:
        wall, cpu = med(m, "wall"), med(m, "cpu")
        smp = med(m, "samples")
        per = (med(m, "prof_cpu") * 1e6 + med(m, "bpf_ns") / 1e3) / smp if smp else 0.0
        bpf = med(m, "bpf_ns") / 1e3 / smp if smp else 0.0
        rss = med(m, "rss_kib") / 1024
        print(f"{m:6} {wall:8.3f} {wall/base_wall:8.3f}x {cpu:8.3f} {cpu/base_cpu:8.3f}x {smp:8.0f} "
              f"{per:15.1f} {bpf if m == 'kprof' else float('nan'):14.2f} {rss:13.1f}")
    agent_us = statistics.median(a for a, _ in steady_runs)
    bpf_us = statistics.median(b for _, b in steady_runs)
    print(f"\nkprof steady state (from 3 s after start to the end of sampling; medians of {len(steady_runs)} runs):"
          f" {agent_us + bpf_us:.1f} µs per sample = agent {agent_us:.1f} + eBPF {bpf_us:.1f}")
    print(f"  targets: < 10 µs CPU per sample: {agent_us + bpf_us:.1f} µs; < 1 % slowdown at 99 Hz: "
          f"{100 * (med('kprof', 'cpu') / base_cpu - 1):+.1f} % CPU, {100 * (med('kprof', 'wall') / base_wall - 1):+.1f} % wall; "
          f"< 64 MiB RSS: {med('kprof', 'rss_kib') / 1024:.1f} MiB")
    # Marginal cost: one more kprof run with 3x the work; Δ(agent CPU + eBPF) / Δsamples.
    d = os.path.join(a.workdir, "kprof-big")
    big = [a.workload, "-n", str(3 * a.work)]
    _, err, rc, _, _ = run([a.agent, "record", "--no-python", "--hz", "99", "-d", "600s", "-o", d, "--"] + big, a.workdir)
    if rc == 0:
        sb = json.load(open(os.path.join(d, "summary.json")))
        small = min(res["kprof"], key=lambda x: abs(x["samples"] - med("kprof", "samples")))
        cpu_big = sb["agent_cpu_s"] + sb["bpf_run_time_ns"] / 1e9
        cpu_small = next(x for x in res["kprof"] if x is small)
        cpu_small = cpu_small["prof_cpu"] + cpu_small["bpf_ns"] / 1e9
        dn = sb["events"] - small["samples"]
        if dn > 0:
            print(f"\nkprof marginal cost (3x work, {sb['events']} vs {small['samples']} samples): "
                  f"{(cpu_big - cpu_small) * 1e6 / dn:.1f} µs per extra sample (agent CPU + eBPF)")
    print(f"kprof eBPF run time per program run (all ticks, targeted or not): median "
          f"{statistics.median(per_run) / 1000:.2f} µs")
    print("\nsteady state: agent user+sys and the sampler's in-kernel run time once warmed up (programs"
          " loaded, kernel symbols read, each binary symbolized once), i.e. what a continuous profiler"
          " pays per sample.")
    print("prof µs/sample: profiler process user+sys (+ eBPF run time for kprof) ÷ samples. perf's"
          " in-kernel sampling cost is not visible to it, and perf defers symbolization to"
          " `perf report` (not run here), while kprof symbolizes and writes pprof + SVG in-process.")


if __name__ == "__main__":
    main()
