//! Kernel text symbols from `/proc/kallsyms`, parsed once into a sorted table (names in one
//! arena). Parsed by kprof rather than re-read per request: procfs files look "modified" to
//! file caches, which made every new kernel stack re-parse the whole file.
use std::{
    fs, io,
    io::{BufRead as _, BufReader},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long the shared table is used before `/proc/kallsyms` is read again (modules loaded
/// later get symbols; reading it costs ~50 ms of CPU).
const SHARED_FOR: Duration = Duration::from_secs(600);

/// The kernel symbols of this machine, shared by every symbolizer of the process (the agent
/// keeps one symbolizer per target; each used to parse its own copy).
pub fn shared() -> Arc<KernelSymbols> {
    static SHARED: Mutex<Option<(Instant, Arc<KernelSymbols>)>> = Mutex::new(None);
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    match &*slot {
        Some((at, k)) if at.elapsed() < SHARED_FOR => Arc::clone(k),
        _ => {
            let k = Arc::new(KernelSymbols::load().unwrap_or_default());
            *slot = Some((Instant::now(), Arc::clone(&k)));
            k
        }
    }
}

/// Sorted kernel text symbols.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (address, start of name in `names`, length of name), sorted by address.
    syms: Vec<(u64, u32, u32)>,
    names: String,
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms` (addresses are zero without CAP_SYSLOG / with kptr_restrict:
    /// the table is then empty and kernel frames stay unresolved).
    pub fn load() -> io::Result<Self> {
        Self::load_from(Path::new("/proc/kallsyms"))
    }

    /// Streams the file line by line (it is ~10 MiB; only text symbols are kept).
    pub fn load_from(path: &Path) -> io::Result<Self> {
        let mut t = KernelSymbols::default();
        let mut reader = BufReader::new(fs::File::open(path)?);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            t.add_line(&line);
            line.clear();
        }
        t.finish();
        Ok(t)
    }

    /// Parses kallsyms text (`addr type name [module]` lines); keeps text symbols only.
    pub fn parse(text: &str) -> Self {
        let mut t = KernelSymbols::default();
        for line in text.lines() {
            t.add_line(line);
        }
        t.finish();
        t
    }

    fn add_line(&mut self, line: &str) {
        let t = self;
        {
            let mut it = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                return;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                return;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                return;
            };
            if addr == 0 {
                return;
            }
            let start = t.names.len() as u32;
            t.names.push_str(name);
            if let Some(module) = it.next() {
                // `[module]`: keep it visible, like perf does.
                t.names.push(' ');
                t.names.push_str(module);
            }
            t.syms.push((addr, start, t.names.len() as u32 - start));
        }
    }

    fn finish(&mut self) {
        self.syms.sort_unstable_by_key(|s| s.0);
        self.syms.dedup_by_key(|s| s.0);
        self.syms.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// The symbol containing `addr` (the nearest one at or below it) and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let idx = self.syms.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (a, start, len) = self.syms[idx];
        Some((
            &self.names[start as usize..(start + len) as usize],
            addr - a,
        ))
    }

    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81000000 T _text
ffffffff81001000 T do_syscall_64
ffffffff81000800 t entry_helper
ffffffff81002000 D some_data
ffffffff81003000 W weak_fn
ffffffffc0001000 t nf_hook\t[nf_tables]
0000000000000000 A fixed_percpu_data
garbage
";

    #[test]
    fn parses_and_looks_up() {
        let k = KernelSymbols::parse(KALLSYMS);
        assert_eq!(k.len(), 5, "text symbols only");
        assert_eq!(k.lookup(0xffffffff81001010), Some(("do_syscall_64", 0x10)));
        assert_eq!(k.lookup(0xffffffff81000900), Some(("entry_helper", 0x100)));
        assert_eq!(k.lookup(0xffffffff81003001), Some(("weak_fn", 1)));
        assert_eq!(
            k.lookup(0xffffffffc0001004),
            Some(("nf_hook [nf_tables]", 4))
        );
        assert_eq!(k.lookup(0x1000), None);
    }

    #[test]
    fn restricted_kallsyms_is_empty() {
        let k = KernelSymbols::parse("0000000000000000 T _text\n0000000000000000 T foo\n");
        assert!(k.is_empty());
        assert_eq!(k.lookup(0xffffffff81000000), None);
    }
}
