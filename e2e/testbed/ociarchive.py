#!/usr/bin/env python3
"""Write a single-layer OCI image-layout archive (tar) without Docker or a registry.

The test bed imports such archives into containerd (`ctr -n k8s.io images import`), so pods
can use `image: NAME:TAG` with `imagePullPolicy: Never`.

    ociarchive.py --name kprof-agent:dev --out agent.tar \
        --entrypoint /usr/local/bin/kprof-agent \
        --file ./target/release/kprof-agent:/usr/local/bin/kprof-agent \
        --host-path /usr/lib/x86_64-linux-gnu/libc.so.6 --host-tree /usr/lib/python3.11

--file SRC:DEST   copy a host file to DEST (mode kept).
--host-path P     copy host path P to the same path in the image, reproducing every symlink
                  met while resolving it (so /lib64/ld-linux... and merged-/usr links work).
--host-tree D     like --host-path, recursively for a directory (skips __pycache__ and
                  *.pyc unless --keep-pyc, and names matching --exclude GLOB).
--tree SRC:DEST   copy a host directory to DEST recursively.
--user UID[:GID]  the user the image runs as when the pod does not say (default: root).
--id-file F       write the image id (the config's digest, as the CRI reports an imported
                  image) and the manifest's digest (a pulled one's repo digest) to F, a line each.

The output is deterministic: fixed mtimes/owners, sorted entries, gzip mtime 0.
The image name is normalised like the CRI does (`foo:1` -> `docker.io/library/foo:1`).
"""

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile

EPOCH = 0
BASE_DIRS = {"/tmp": 0o1777, "/proc": 0o555, "/sys": 0o555, "/dev": 0o755, "/etc": 0o755,
             "/run": 0o755, "/var": 0o755, "/var/tmp": 0o1777, "/root": 0o700,
             "/usr": 0o755, "/usr/local": 0o755, "/usr/local/bin": 0o755}
ETC_FILES = {
    "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                   "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n",
    "/etc/group": "root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n",
    "/etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}


def normalise_ref(ref):
    """Return the fully qualified reference the CRI plugin looks up for `ref`."""
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:  # no tag given
        name, tag = ref, "latest"
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = "docker.io/library/" + name
    elif not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + name
    return f"{name}:{tag}", tag


class Layer:
    def __init__(self, keep_pyc=False, exclude=()):
        self.entries = {}  # image path -> (kind, data)
        self.keep_pyc = keep_pyc
        self.exclude = tuple(exclude)

    def _excluded(self, name):
        return (not self.keep_pyc and (name == "__pycache__" or name.endswith(".pyc"))) or any(
            fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    # kinds: ("dir", mode) ("file", hostpath, mode) ("bytes", bytes, mode) ("link", target)
    def _parents(self, path):
        parts = path.strip("/").split("/")[:-1]
        cur = ""
        for p in parts:
            cur += "/" + p
            if cur not in self.entries:
                self.entries[cur] = ("dir", 0o755)

    def add_dir(self, path, mode=0o755):
        self._parents(path)
        if self.entries.get(path, ("",))[0] != "link":
            self.entries[path] = ("dir", mode)

    def add_bytes(self, path, data, mode=0o644):
        self._parents(path)
        self.entries[path] = ("bytes", data, mode)

    def add_file(self, src, dest):
        st = os.stat(src)
        self._parents(dest)
        self.entries[dest] = ("file", os.path.realpath(src), stat.S_IMODE(st.st_mode))

    def add_link(self, path, target):
        self._parents(path)
        self.entries[path] = ("link", target)

    def add_host_path(self, path):
        """Copy `path` at the same location, recording each symlink on the way."""
        path = os.path.abspath(path)
        seen = 0
        while True:
            seen += 1
            if seen > 40:
                raise SystemExit(f"too many symlinks resolving {path}")
            parts = path.strip("/").split("/")
            cur = ""
            for i, p in enumerate(parts):
                cur += "/" + p
                if os.path.islink(cur):
                    target = os.readlink(cur)
                    self.add_link(cur, target)
                    resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
                    path = resolved + ("/" + "/".join(parts[i + 1:]) if i + 1 < len(parts) else "")
                    break
            else:
                break
        if os.path.isdir(path):
            self.add_dir(path, stat.S_IMODE(os.stat(path).st_mode))
        else:
            self.add_file(path, path)
        return path

    def add_host_tree(self, root):
        root = self.add_host_path(root)
        self.add_tree(root, root)

    def add_tree(self, src, dest):
        src = os.path.realpath(src)
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if not self._excluded(d))
            rel = os.path.relpath(dirpath, src)
            ddir = dest if rel == "." else os.path.join(dest, rel)
            self.add_dir(ddir, stat.S_IMODE(os.stat(dirpath).st_mode))
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    self.add_link(os.path.join(ddir, d), os.readlink(full))
            for f in sorted(filenames):
                if self._excluded(f):
                    continue
                full = os.path.join(dirpath, f)
                if os.path.islink(full):
                    self.add_link(os.path.join(ddir, f), os.readlink(full))
                elif os.path.isfile(full):
                    self.add_file(full, os.path.join(ddir, f))

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path in sorted(self.entries):
                kind = self.entries[path]
                ti = tarfile.TarInfo(path.lstrip("/"))
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, 0, 0, "root", "root"
                if kind[0] == "dir":
                    ti.type, ti.mode = tarfile.DIRTYPE, kind[1]
                    tf.addfile(ti)
                elif kind[0] == "link":
                    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, kind[1], 0o777
                    tf.addfile(ti)
                elif kind[0] == "bytes":
                    ti.size, ti.mode = len(kind[1]), kind[2]
                    tf.addfile(ti, io.BytesIO(kind[1]))
                else:
                    ti.size, ti.mode = os.path.getsize(kind[1]), kind[2]
                    with open(kind[1], "rb") as fh:
                        tf.addfile(ti, fh)
        return buf.getvalue()


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--user", default="")
    ap.add_argument("--id-file", default="")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DEST")
    ap.add_argument("--tree", action="append", default=[], metavar="SRC:DEST")
    ap.add_argument("--host-path", action="append", default=[])
    ap.add_argument("--host-tree", action="append", default=[])
    ap.add_argument("--link", action="append", default=[], metavar="PATH:TARGET")
    ap.add_argument("--keep-pyc", action="store_true")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="skip files/directories whose name matches, in --tree/--host-tree")
    ap.add_argument("--no-base", action="store_true", help="no /tmp, /etc/passwd etc.")
    a = ap.parse_args()

    layer = Layer(keep_pyc=a.keep_pyc, exclude=a.exclude)
    if not a.no_base:
        for d, mode in BASE_DIRS.items():
            layer.add_dir(d, mode)
        for p, text in ETC_FILES.items():
            layer.add_bytes(p, text.encode())
    for spec in a.host_path:
        layer.add_host_path(spec)
    for spec in a.host_tree:
        layer.add_host_tree(spec)
    for spec in a.file:
        src, _, dest = spec.partition(":")
        layer.add_file(src, dest)
    for spec in a.tree:
        src, _, dest = spec.partition(":")
        layer.add_tree(src, dest)
    for spec in a.link:
        path, _, target = spec.partition(":")
        layer.add_link(path, target)

    raw = layer.tar_bytes()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(raw)
    layer_gz = gz.getvalue()

    ref, tag = normalise_ref(a.name)
    env = a.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    cfg = {"Env": env, "WorkingDir": a.workdir}
    if a.entrypoint:
        cfg["Entrypoint"] = a.entrypoint
    if a.cmd:
        cfg["Cmd"] = a.cmd
    if a.user:
        cfg["User"] = a.user
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [sha(raw)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "kprof e2e/testbed/ociarchive.py"}],
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer_gz), "size": len(layer_gz)}],
    }, sort_keys=True, separators=(",", ":")).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
        }],
    }, sort_keys=True, separators=(",", ":")).encode()

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def put(name, data):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), EPOCH, 0o644
            tf.addfile(ti, io.BytesIO(data))
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tf.addfile(ti)
        for blob in sorted([config, manifest, layer_gz], key=sha):
            put("blobs/sha256/" + sha(blob)[7:], blob)
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", index)
    os.replace(tmp, a.out)
    if a.id_file:
        with open(a.id_file, "w") as fh:
            fh.write(sha(config) + "\n" + sha(manifest) + "\n")
    print(f"{ref} {sha(manifest)} layer={len(raw) // 1024}KiB gz={len(layer_gz) // 1024}KiB -> {a.out}", file=sys.stderr)
    print(ref)


if __name__ == "__main__":
    main()
