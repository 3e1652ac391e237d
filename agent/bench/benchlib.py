"""What the benchmark drivers share: running a command with its output kept in files."""
import os
import subprocess


def run(cmd, workdir):
    """Runs `cmd`; returns its stdout, stderr and exit code (kept in `workdir`, not pipes, so a
    chatty agent never blocks on a full pipe)."""
    out_path, err_path = os.path.join(workdir, "out.txt"), os.path.join(workdir, "err.txt")
    with open(out_path, "w") as o, open(err_path, "w") as e:
        p = subprocess.run(cmd, stdout=o, stderr=e)
    return open(out_path).read(), open(err_path).read(), p.returncode
