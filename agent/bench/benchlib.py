"""What the benchmark drivers share: running a command with its output kept in files."""
import os
import re
import subprocess


def run(cmd, workdir):
    """Runs `cmd`; returns its stdout, stderr and exit code (kept in `workdir`, not pipes, so a
    chatty agent never blocks on a full pipe)."""
    out_path, err_path = os.path.join(workdir, "out.txt"), os.path.join(workdir, "err.txt")
    with open(out_path, "w") as o, open(err_path, "w") as e:
        p = subprocess.run(cmd, stdout=o, stderr=e)
    return open(out_path).read(), open(err_path).read(), p.returncode


def figures(out, rate):
    """`wall_s=… cpu_s=… <rate>=…` from a workload's output: (wall, cpu, rate)."""
    m = re.search(rf"wall_s=([\d.]+) cpu_s=([\d.]+) {rate}=(\d+)", out)
    if not m:
        raise SystemExit(f"workload output not understood: {out!r}")
    return float(m.group(1)), float(m.group(2)), int(m.group(3))
