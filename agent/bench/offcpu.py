#!/usr/bin/env python3
"""Driver of agent/bench/offcpu.sh (see there). Prints one table of medians and ratios."""
import argparse, json, os, statistics, subprocess, sys, time

from benchlib import figures, run


def parse(out):
    return figures(out, "switches_per_s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--perf", default="perf")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-trips", type=int, default=100000)
    ap.add_argument("--work", type=int, default=2000)
    a = ap.parse_args()
    # Both threads on one CPU: every hand-off is a switch on that CPU, and the figures do not
    # depend on how deep the other CPU idles (cross-CPU wake-ups cost a VM exit here).
    wl = ["taskset", "-c", "0", a.workload, "-n", str(a.round_trips), "-w", str(a.work)]
    have_perf = subprocess.run([a.perf, "--version"], capture_output=True).returncode == 0
    modes = ["none", "kprof cpu", "kprof wall,lock"] + (["perf sched_switch -g"] if have_perf else [])
    res = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for m in order:
            extra = ""
            if m == "none":
                out, err, rc = run(wl, a.workdir)
            elif m.startswith("kprof"):
                types = "cpu" if m == "kprof cpu" else "cpu,wall,lock"
                d = os.path.join(a.workdir, f"k-{r}")
                out, err, rc = run([a.agent, "record", "--types", types, "-d", "600s", "-o", d, "--"] + wl,
                                   a.workdir)
                if rc == 0:
                    s = json.load(open(os.path.join(d, "summary.json")))
                    runs = max(1, s["off_cpu_bpf_run_count"])
                    extra = dict(agent_cpu=s["agent_cpu_s"], switch_outs=s["switch_outs"],
                                 captured=s["switch_outs_captured"],
                                 offcpu_ns_per_run=s["off_cpu_bpf_run_time_ns"] / runs)
                out = out.split("SELF%")[0]
            else:
                data = os.path.join(a.workdir, "perf.data")
                out, err, rc = run([a.perf, "record", "-e", "sched:sched_switch", "-g", "-o", data, "--"] + wl,
                                   a.workdir)
            if rc != 0:
                raise SystemExit(f"{m} failed ({rc}): {err[-2000:]}")
            wall, cpu, rate = parse(out)
            res[m].append(dict(wall=wall, cpu=cpu, rate=rate, extra=extra or {}))
            print(f"round {r+1} {m:22}: wall {wall:.3f}s cpu {cpu:.3f}s {rate} switches/s {extra}",
                  file=sys.stderr)

    med = lambda m, k: statistics.median(x[k] for x in res[m])
    base = med("none", "wall")
    print(f"\nkprof off-CPU benchmark: {a.rounds} rounds, {a.round_trips} round trips, medians")
    print(f"{'mode':24} {'wall s':>8} {'slowdown':>9} {'switches/s':>11} {'agent cpu s':>12} "
          f"{'captured/switch-outs':>21} {'eBPF ns/switch':>15}")
    for m in modes:
        ex = [x["extra"] for x in res[m] if x["extra"]]
        agent = f"{statistics.median(e['agent_cpu'] for e in ex):.3f}" if ex else "-"
        cap = f"{ex[-1]['captured']}/{ex[-1]['switch_outs']}" if ex and ex[-1]["switch_outs"] else "-"
        ns = f"{statistics.median(e['offcpu_ns_per_run'] for e in ex):.0f}" if ex and ex[-1]["switch_outs"] else "-"
        print(f"{m:24} {med(m, 'wall'):8.3f} {med(m, 'wall') / base - 1:+9.1%} {med(m, 'rate'):11.0f} "
              f"{agent:>12} {cap:>21} {ns:>15}")
    print("targets: wall,lock slowdown <= 5 % at ~50,000 switches/s")

    # Untargeted: the workload is not a target; kprof profiles an idle process with wall on.
    idle = subprocess.Popen(["sleep", "600"])
    d = os.path.join(a.workdir, "untargeted")
    agent = subprocess.Popen([a.agent, "record", "--types", "wall", "-d", "600s", "-p", str(idle.pid), "-o", d],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    walls = [parse(run(wl, a.workdir)[0])[0] for _ in range(a.rounds)]
    agent.send_signal(2)
    agent.wait()
    idle.kill()
    s = json.load(open(os.path.join(d, "summary.json")))
    runs = max(1, s["off_cpu_bpf_run_count"])
    print(f"\nuntargeted context switches while kprof profiles another process (wall): "
          f"{s['off_cpu_bpf_run_time_ns'] / runs:.0f} ns of eBPF per switch over {runs} switches "
          f"(target <= 100 ns); workload wall {statistics.median(walls):.3f}s vs {base:.3f}s unprofiled "
          f"({statistics.median(walls) / base - 1:+.1%})")


if __name__ == "__main__":
    main()
