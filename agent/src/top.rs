//! The top table: per function, the share of samples where it is the leaf (self) and where it is
//! anywhere on the stack (total), sorted by self.
use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use crate::profile::{FrameKind, Profile};

/// One row of the top table.
#[derive(Clone, Debug, PartialEq)]
pub struct TopRow {
    pub kind: FrameKind,
    pub function: Arc<str>,
    /// `file:line` (line = smallest line seen in the function) or the module.
    pub location: String,
    pub self_samples: u64,
    pub total_samples: u64,
    pub self_pct: f64,
    pub total_pct: f64,
}

/// A function's identity in the table: kind, name, file.
type FnKey = (FrameKind, Arc<str>, Option<Arc<str>>);

/// Computes the top table of a profile (all rows, sorted by self, then total, then name).
pub fn top(profile: &Profile) -> Vec<TopRow> {
    #[derive(Default)]
    struct Acc {
        self_n: u64,
        total_n: u64,
        file: Option<Arc<str>>,
        line: u32,
        module: Option<Arc<str>>,
    }
    let total = profile.total();
    let mut acc: HashMap<FnKey, Acc> = HashMap::new();
    for (key, &count) in &profile.samples {
        for (i, f) in key.stack.iter().enumerate() {
            let first = key.stack[..i]
                .iter()
                .position(|g| g.kind == f.kind && g.function == f.function && g.file == f.file)
                .unwrap_or(i);
            let a = acc
                .entry((f.kind, f.function.clone(), f.file.clone()))
                .or_default();
            if i == 0 {
                a.self_n += count;
            }
            // Recursion: count a function once per stack for `total`.
            // Recursion: a function counts once per stack in `total`.
            if first == i {
                a.total_n += count;
            }
            if f.line > 0 && (a.line == 0 || f.line < a.line) {
                a.line = f.line;
            }
            if a.file.is_none() {
                a.file.clone_from(&f.file);
            }
            if a.module.is_none() {
                a.module.clone_from(&f.module);
            }
        }
    }
    let pct = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 * 100.0 / total as f64
        }
    };
    let mut rows: Vec<TopRow> = acc
        .into_iter()
        .map(|((kind, function, _), a)| TopRow {
            kind,
            function,
            location: match (&a.file, a.line) {
                (Some(f), 0) => f.to_string(),
                (Some(f), l) => format!("{f}:{l}"),
                (None, _) => a.module.as_deref().unwrap_or("").to_owned(),
            },
            self_samples: a.self_n,
            total_samples: a.total_n,
            self_pct: pct(a.self_n),
            total_pct: pct(a.total_n),
        })
        .collect();
    rows.sort_by(|a, b| {
        b.self_samples
            .cmp(&a.self_samples)
            .then(b.total_samples.cmp(&a.total_samples))
            .then_with(|| a.function.cmp(&b.function))
    });
    rows
}

/// Renders the first `limit` rows as a fixed-width text table.
pub fn render(rows: &[TopRow], limit: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>7} {:>7}  {:<48} LOCATION",
        "SELF%", "TOTAL%", "FUNCTION"
    );
    for r in rows.iter().take(limit) {
        let mut name = r.function.to_string();
        if name.chars().count() > 48 {
            name = name.chars().take(47).collect::<String>() + "…";
        }
        let _ = writeln!(
            s,
            "{:>6.2}% {:>6.2}%  {:<48} {}",
            r.self_pct, r.total_pct, name, r.location
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::profile::{Frame, SampleKey};

    fn key(stack: &[(&str, u32)]) -> SampleKey {
        SampleKey {
            pid: 1,
            thread: "main".into(),
            stack: stack
                .iter()
                .map(|(f, l)| Frame {
                    file: Some("a.c".into()),
                    line: *l,
                    ..Frame::new(FrameKind::Native, *f)
                })
                .collect::<Vec<_>>()
                .into(),
        }
    }

    #[test]
    fn self_and_total_percentages() {
        let mut p = Profile::new(99, SystemTime::UNIX_EPOCH);
        // leaf first
        p.add(key(&[("hot", 10), ("main", 3)]), 60);
        p.add(key(&[("warm", 20), ("main", 4)]), 30);
        p.add(key(&[("main", 5)]), 10);
        let rows = top(&p);
        assert_eq!(&*rows[0].function, "hot");
        assert!((rows[0].self_pct - 60.0).abs() < 1e-9);
        assert!((rows[0].total_pct - 60.0).abs() < 1e-9);
        assert_eq!(&*rows[1].function, "warm");
        let main = rows.iter().find(|r| &*r.function == "main").unwrap();
        assert_eq!(main.self_samples, 10);
        assert!((main.total_pct - 100.0).abs() < 1e-9);
        assert_eq!(main.location, "a.c:3", "smallest line seen");
        let sum_self: f64 = rows.iter().map(|r| r.self_pct).sum();
        assert!((sum_self - 100.0).abs() < 1e-9, "self sums to 100%");
    }

    #[test]
    fn recursion_counts_once_in_total() {
        let mut p = Profile::new(99, SystemTime::UNIX_EPOCH);
        p.add(key(&[("fib", 2), ("fib", 2), ("fib", 2), ("main", 1)]), 5);
        let rows = top(&p);
        let fib = rows.iter().find(|r| &*r.function == "fib").unwrap();
        assert_eq!(fib.total_samples, 5);
        assert_eq!(fib.self_samples, 5);
        let text = render(&rows, 10);
        assert!(text.contains("100.00%"), "{text}");
        assert!(text.lines().next().unwrap().contains("SELF%"));
    }

    #[test]
    fn empty_profile() {
        let p = Profile::new(99, SystemTime::UNIX_EPOCH);
        assert!(top(&p).is_empty());
    }
}
