# Sourced by the benchmark scripts: the kprof-agent they run. $AGENT when set, else a release
# build of this checkout (a no-op when up to date). Needs $root (the repository).
if [[ -z "${AGENT:-}" ]]; then
    (cd "$root" && cargo build --release -p kprof-agent >&2)
    AGENT="${CARGO_TARGET_DIR:-$root/target}/release/kprof-agent"
fi
