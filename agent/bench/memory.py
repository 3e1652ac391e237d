#!/usr/bin/env python3
"""Driver of agent/bench/memory.sh (see there). Prints one table of medians and ratios, then
what a memory profile costs other processes' syscalls and what allocation probes cost a probed
process per reported allocation."""
import argparse, json, os, re, statistics, subprocess, sys, time

from benchlib import figures, run

# The workload: a fixed amount of work that allocates and frees fast (lists of small objects,
# 64 KiB buffers) and keeps a little; prints its time and the MB/s it allocated (the sizes of
# what it created, by sys.getsizeof).
WORKLOAD = r"""
import sys, time
rounds = int(sys.argv[1])
kept = []
t0 = time.perf_counter(); c0 = time.process_time()
made = 0
for r in range(rounds):
    objs = [("item-%d" % i) * 4 for i in range(20_000)]
    made += sum(sys.getsizeof(o) for o in objs) + sys.getsizeof(objs)
    bufs = [bytes([i % 251]) * 65536 for i in range(16)]
    made += 16 * 65536
    if r % 50 == 0:
        kept.append(bufs[0])
    del objs, bufs
wall = time.perf_counter() - t0
print(f"wall_s={wall:.4f} cpu_s={time.process_time() - c0:.4f} mb_per_s={made / wall / 1e6:.0f}")
"""

# Allocations reported to CPython as NumPy reports its arrays (PyTraceMalloc_Track, then
# _Untrack), timed after a pause in which the agent attaches its probes: ns per pair.
PROBED = r"""
import ctypes, sys, time
track = ctypes.pythonapi.PyTraceMalloc_Track
track.argtypes = [ctypes.c_uint, ctypes.c_size_t, ctypes.c_size_t]
untrack = ctypes.pythonapi.PyTraceMalloc_Untrack
untrack.argtypes = [ctypes.c_uint, ctypes.c_size_t]
time.sleep(float(sys.argv[2]))
n = int(sys.argv[1])
t0 = time.perf_counter()
for i in range(n):
    track(389047, 0x100000000 + i * 4096, 4096)
    untrack(389047, 0x100000000 + i * 4096)
print(f"ns_per_pair={(time.perf_counter() - t0) / n * 1e9:.0f}")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--python", default="python3")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--syscalls", help="a program printing ns_per_syscall=…")
    a = ap.parse_args()
    script = os.path.join(a.workdir, "alloc.py")
    open(script, "w").write(WORKLOAD)
    # Rounds for about `seconds` of unprofiled work, calibrated once.
    out, err, rc = run([a.python, script, "200"], a.workdir)
    if rc != 0:
        raise SystemExit(f"workload failed: {err[-2000:]}")
    wall, _, _ = figures(out, "mb_per_s")
    n = max(200, int(200 * a.seconds / max(wall, 1e-3)))
    wl = [a.python, script, str(n)]
    modes = ["none", "kprof memory", "tracemalloc", "memray"]
    res = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for m in order:
            extra = {}
            if m == "none":
                out, err, rc = run(wl, a.workdir)
            elif m == "tracemalloc":
                out, err, rc = run([a.python, "-X", "tracemalloc"] + wl[1:], a.workdir)
            elif m == "memray":
                f = os.path.join(a.workdir, f"memray-{r}.bin")
                out, err, rc = run([a.python, "-m", "memray", "run", "-q", "-f", "-o", f] + wl[1:],
                                   a.workdir)
            else:
                d = os.path.join(a.workdir, f"k-{r}")
                out, err, rc = run([a.agent, "record", "--types", "memory", "-d", "600s", "-o", d,
                                    "--"] + wl, a.workdir)
                if rc == 0:
                    s = json.load(open(os.path.join(d, "summary.json")))
                    extra = dict(agent_cpu=s["agent_cpu_s"], rss=s["peak_rss_kib"] / 1024,
                                 samples=s["memory"]["samples"])
                out = out.split("SELF%")[0]
            if rc != 0:
                raise SystemExit(f"{m} failed ({rc}): {err[-2000:]}")
            wall, cpu, rate = figures(out, "mb_per_s")
            res[m].append(dict(wall=wall, cpu=cpu, rate=rate, extra=extra))
            print(f"round {r+1} {m:13}: wall {wall:.3f}s cpu {cpu:.3f}s {rate} MB/s {extra}",
                  file=sys.stderr)

    med = lambda m, k: statistics.median(x[k] for x in res[m])
    base = med("none", "wall")
    print(f"\nkprof memory benchmark: {a.rounds} rounds, {n} rounds of work "
          f"(~{med('none', 'rate'):.0f} MB/s allocated unprofiled), medians")
    print(f"{'mode':14} {'wall s':>8} {'MB/s':>7} {'slowdown':>9} {'agent cpu s':>12} "
          f"{'agent rss MiB':>14} {'samples':>8}")
    for m in modes:
        ex = [x["extra"] for x in res[m] if x["extra"]]
        agent = f"{statistics.median(e['agent_cpu'] for e in ex):.3f}" if ex else "-"
        rss = f"{statistics.median(e['rss'] for e in ex):.1f}" if ex else "-"
        samples = str(ex[-1]["samples"]) if ex else "-"
        slow = (med(m, "wall") / base - 1) * 100
        print(f"{m:14} {med(m, 'wall'):8.3f} {med(m, 'rate'):7.0f} {slow:8.1f}% {agent:>12} "
              f"{rss:>14} {samples:>8}")
    print("target: kprof memory <= 2 % slowdown, far below tracemalloc and memray")
    if a.syscalls:
        syscall_cost(a)
    probe_cost(a)


def syscall_cost(a):
    """ns per syscall of an untargeted loop, alone and while a memory profile of another process
    runs (its memory source hooks sys_exit, which every process's syscalls then pass)."""
    def loop():
        out = subprocess.run([a.syscalls], capture_output=True, text=True).stdout
        return float(re.search(r"ns_per_syscall=([\d.]+)", out).group(1))
    alone = statistics.median(loop() for _ in range(3))
    d = os.path.join(a.workdir, "k-sys")
    agent = subprocess.Popen([a.agent, "record", "--types", "memory", "-d", "60s", "-o", d, "--",
                              "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(5)
    try:
        profiled = statistics.median(loop() for _ in range(3))
    finally:
        agent.terminate()
        agent.wait()
    print(f"\nuntargeted syscall loop: {alone:.1f} ns/syscall alone, {profiled:.1f} with a memory "
          f"profile running on the node (+{profiled - alone:.1f} ns: the sys_exit hook)")


def probe_cost(a):
    """ns per reported allocation and free, unprobed and probed (`--alloc-probes`): each call
    then traps into the kernel; medians of `rounds`."""
    script = os.path.join(a.workdir, "probed.py")
    open(script, "w").write(PROBED)
    n, pause = "300000", "3"
    def pair(out):
        return float(re.search(r"ns_per_pair=([\d.]+)", out).group(1))
    alone, probed = [], []
    for r in range(a.rounds):
        out, err, rc = run([a.python, script, n, pause], a.workdir)
        if rc != 0:
            raise SystemExit(f"probe workload failed: {err[-2000:]}")
        alone.append(pair(out))
        d = os.path.join(a.workdir, f"k-probe-{r}")
        out, err, rc = run([a.agent, "record", "--types", "memory", "--alloc-probes", "-d",
                            "600s", "-o", d, "--", a.python, script, n, pause], a.workdir)
        if rc != 0:
            raise SystemExit(f"kprof with allocation probes failed ({rc}): {err[-2000:]}")
        s = json.load(open(os.path.join(d, "summary.json")))
        if s["memory"]["probed_bytes"] == 0:
            raise SystemExit(f"the allocation probes saw nothing: {err[-2000:]}")
        probed.append(pair(out))
    alone, probed = statistics.median(alone), statistics.median(probed)
    print(f"\nallocation probes: {alone / 1000:.2f} µs per reported allocation and free alone "
          f"(ctypes calls), {probed / 1000:.2f} µs probed (+{(probed - alone) / 2000:.2f} µs per "
          f"probed call: two traps per pair), medians of {a.rounds}")


if __name__ == "__main__":
    main()
