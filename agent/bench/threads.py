#!/usr/bin/env python3
"""Driver of agent/bench/threads.sh (see there). Prints one table of medians and ratios."""
import argparse, json, os, statistics, sys

from benchlib import figures, run

# The workload: creates THREADS threads at about RATE a second (each starts, does nothing and
# is joined, a few at once) and prints how long that took and the rate it reached.
WORKLOAD = r"""
import sys, threading, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
def nothing():
    pass
t0 = time.perf_counter(); c0 = time.process_time()
done = 0
while done < n:
    batch = [threading.Thread(target=nothing, name=f"t{done + i}") for i in range(10)]
    for t in batch:
        t.start()
    for t in batch:
        t.join()
    done += 10
    ahead = done / rate - (time.perf_counter() - t0)
    if ahead > 0:
        time.sleep(ahead)
wall = time.perf_counter() - t0
print(f"wall_s={wall:.4f} cpu_s={time.process_time() - c0:.4f} threads_per_s={n / wall:.0f}")
"""


def parse(out):
    return figures(out, "threads_per_s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--python", default="python3")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8000)
    a = ap.parse_args()
    script = os.path.join(a.workdir, "create.py")
    open(script, "w").write(WORKLOAD)
    # Paced at 1,000 a second: the CPU each creation costs is the figure (wall is the pace).
    wl = [a.python, script, str(a.threads), "1000"]
    modes = ["none", "kprof cpu", "kprof threads"]
    res = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for m in order:
            extra = {}
            if m == "none":
                out, err, rc = run(wl, a.workdir)
            else:
                d = os.path.join(a.workdir, f"k-{r}")
                types = m.split()[1]
                out, err, rc = run([a.agent, "record", "--types", types, "-d", "600s", "-o", d, "--"] + wl,
                                   a.workdir)
                if rc == 0:
                    s = json.load(open(os.path.join(d, "summary.json")))
                    extra = dict(agent_cpu=s["agent_cpu_s"])
                    if "threads" in s:
                        procs = s["threads"]["threads"]["processes"]
                        extra["created"] = sum(p["created"] for p in procs)
                out = out.split("SELF%")[0]
            if rc != 0:
                raise SystemExit(f"{m} failed ({rc}): {err[-2000:]}")
            wall, cpu, rate = parse(out)
            res[m].append(dict(wall=wall, cpu=cpu, rate=rate, extra=extra))
            print(f"round {r+1} {m:14}: wall {wall:.3f}s cpu {cpu:.3f}s {rate} threads/s {extra}",
                  file=sys.stderr)

    med = lambda m, k: statistics.median(x[k] for x in res[m])
    base_cpu = med("none", "cpu")
    print(f"\nkprof threads benchmark: {a.rounds} rounds, {a.threads} threads at ~1,000/s, medians")
    print(f"{'mode':16} {'wall s':>8} {'threads/s':>10} {'workload cpu s':>15} {'cpu ratio':>10} "
          f"{'agent cpu s':>12} {'creations seen':>15}")
    for m in modes:
        ex = [x["extra"] for x in res[m] if x["extra"]]
        agent = f"{statistics.median(e['agent_cpu'] for e in ex):.3f}" if ex else "-"
        seen = str(ex[-1].get("created", "-")) if ex else "-"
        print(f"{m:16} {med(m, 'wall'):8.3f} {med(m, 'rate'):10.0f} {med(m, 'cpu'):15.3f} "
              f"{med(m, 'cpu') / base_cpu:10.2f} {agent:>12} {seen:>15}")
    print("target: the threads profile adds <= 5 % to the workload's CPU at 1,000 threads/s")


if __name__ == "__main__":
    main()
