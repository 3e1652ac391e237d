"""A loop that runs exactly in step with the sampler: the worst case for a fixed sampling period.

Iteration k starts at t0 + k * PERIOD on the monotonic clock (the clock the kernel's sampling timer
runs on), so a timer with the same period sees every iteration at the same phase. Each iteration
gives three functions fixed slices of it:

  alpha  50 %  (hot line L:alpha_hot)
  beta   30 %  (hot line L:beta_hot)
  gamma  20 %  (hot line L:gamma_hot)

The truth is measured, not assumed: each function adds the CPU time of its own thread that it
used (time.thread_time_ns), so preemption by other work does not count.

usage: periodic.py PERIOD_NS SECONDS TRUTH_FILE
Prints `READY <pid>` when it starts; writes `alpha=<ns> beta=<ns> gamma=<ns> iterations=<n>` to
TRUTH_FILE at the end.
"""
import os
import sys
import time

now = time.monotonic_ns
cpu = time.thread_time_ns
SLICES = (("alpha", 0.5), ("beta", 0.3), ("gamma", 0.2))
used = {name: 0 for name, _ in SLICES}


def alpha(deadline):
    c = cpu()
    while now() < deadline: pass  # L:alpha_hot
    used["alpha"] += cpu() - c


def beta(deadline):
    c = cpu()
    while now() < deadline: pass  # L:beta_hot
    used["beta"] += cpu() - c


def gamma(deadline):
    c = cpu()
    while now() < deadline: pass  # L:gamma_hot
    used["gamma"] += cpu() - c


def main():
    period = int(sys.argv[1])
    seconds = float(sys.argv[2])
    truth = sys.argv[3]
    funcs = {"alpha": alpha, "beta": beta, "gamma": gamma}
    print("READY", os.getpid(), flush=True)
    t0 = now()
    iterations = int(seconds * 1e9 / period)
    for k in range(iterations):
        start = t0 + k * period
        offset = 0.0
        for name, share in SLICES:
            offset += share
            funcs[name](start + int(offset * period))
    with open(truth, "w") as f:
        f.write(" ".join(f"{n}={v}" for n, v in used.items()))
        f.write(f" iterations={iterations}\n")


main()
