//! What users look at, derived from a pprof [`Profile`]: the top table, folded stacks, flame
//! graphs and differential flame graphs. The agent (`record`, the Profile objects), the store
//! (rendering on read, the web page) and `kubectl kprof` all draw them from here, so the same
//! profile gives the same picture everywhere.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use inferno::flamegraph::{self, Options};
use serde::{Deserialize, Serialize};

use crate::{Profile, labels, mappings};

/// One frame: function name, `file:line` when known, and the file of its mapping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
    /// The mapping's file name (a binary, [`mappings::KERNEL`], [`mappings::PYTHON`]) or "".
    pub module: String,
}

/// One sample: the process it came from (when labelled), its frames root first, its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Stack {
    /// `name (pid)` from the `process_name` and `pid` labels.
    pub process: Option<String>,
    pub frames: Vec<Frame>,
    pub value: i64,
}

/// The most that [`Stacks::from_profile`] copies out of a profile: 64 MiB of frames and
/// process names (a profile as the agent writes one holds well under a MiB).
pub const MAX_STACKS_BYTES: usize = 64 << 20;

/// What one frame or stack costs besides its names, for [`MAX_STACKS_BYTES`].
const STACK_BYTES: usize = std::mem::size_of::<Frame>();

/// The one frame of the samples that [`Stacks::from_profile`] had no room left for.
pub const TRUNCATED: &str = "[truncated: more stacks than kprof shows]";

/// The stacks of a profile with their value for one sample type.
#[derive(Clone, Debug, Default)]
pub struct Stacks {
    pub stacks: Vec<Stack>,
    pub total: i64,
    /// `type/unit` of the value, e.g. `cpu/nanoseconds`.
    pub unit: String,
    /// The top table's "self" is the site: the innermost Python frame, else the innermost
    /// frame outside the kernel. In wall and lock profiles every wait ends in the scheduler
    /// and the C library, in memory profiles every first touch in the allocator and `memset`,
    /// and the place that matters is the code that waits or allocates (set by
    /// [`Stacks::from_profile`] for those types).
    pub wait_sites: bool,
}

impl Stacks {
    /// Resolve every sample of `p` into frames, with the value at `value_index`.
    ///
    /// Every frame is its own copy of its names, so a few bytes of a profile (a location id,
    /// a label) can stand for a name of any length: the stacks hold at most
    /// [`MAX_STACKS_BYTES`] of frames and process names. The samples past that limit are
    /// counted in one [`TRUNCATED`] stack, so that the total still adds up.
    pub fn from_profile(p: &Profile, value_index: usize) -> Self {
        let functions: HashMap<u64, _> = p.function.iter().map(|f| (f.id, f)).collect();
        let locations: HashMap<u64, _> = p.location.iter().map(|l| (l.id, l)).collect();
        let modules: HashMap<u64, &str> = p
            .mapping
            .iter()
            .map(|m| (m.id, p.str(m.filename)))
            .collect();
        let sample_types = p.sample_types();
        let mut out = Stacks {
            unit: sample_types.get(value_index).cloned().unwrap_or_default(),
            wait_sites: sample_types.first().is_some_and(|t| {
                t.starts_with(&format!("{}/", crate::types::WALL.sample_types[0].r#type))
                    || t.starts_with(&format!("{}/", crate::types::LOCK.sample_types[0].r#type))
                    || t.starts_with(&format!("{}/", crate::types::MEMORY.sample_types[0].r#type))
            }),
            ..Default::default()
        };
        // What the stacks hold so far, and where the samples past the limit are counted.
        let mut held = 0usize;
        let mut truncated: Option<usize> = None;
        'samples: for s in &p.sample {
            let value = s.value.get(value_index).copied().unwrap_or(0);
            if value == 0 {
                continue;
            }
            out.total = out.total.saturating_add(value);
            if let Some(i) = truncated {
                out.stacks[i].value = out.stacks[i].value.saturating_add(value);
                continue;
            }
            let mut budget = |bytes: usize| {
                held = held.saturating_add(STACK_BYTES.saturating_add(bytes));
                held <= MAX_STACKS_BYTES
            };
            let process = process(p, s);
            let mut fits = budget(process.as_ref().map_or(0, String::len));
            let mut frames = Vec::new();
            for id in &s.location_id {
                let Some(loc) = locations.get(id) else {
                    continue;
                };
                let module = modules.get(&loc.mapping_id).copied().unwrap_or("");
                if loc.line.is_empty() {
                    fits = fits && budget(module.len() + 18);
                    if !fits {
                        break;
                    }
                    frames.push(Frame {
                        function: format!("0x{:x}", loc.address),
                        file: String::new(),
                        line: 0,
                        module: module.to_owned(),
                    });
                }
                for l in &loc.line {
                    let (function, file) = match functions.get(&l.function_id) {
                        Some(f) => {
                            let name = if f.name != 0 {
                                p.str(f.name)
                            } else {
                                p.str(f.system_name)
                            };
                            (name, p.str(f.filename))
                        }
                        None => ("?", ""),
                    };
                    fits = fits && budget(function.len() + file.len() + module.len());
                    if !fits {
                        break;
                    }
                    frames.push(Frame {
                        function: function.to_owned(),
                        file: file.to_owned(),
                        line: l.line,
                        module: module.to_owned(),
                    });
                }
                if !fits {
                    break;
                }
            }
            if !fits {
                truncated = Some(out.stacks.len());
                out.stacks.push(Stack {
                    process: None,
                    frames: vec![Frame {
                        function: TRUNCATED.to_owned(),
                        file: String::new(),
                        line: 0,
                        module: String::new(),
                    }],
                    value,
                });
                continue 'samples;
            }
            frames.reverse(); // leaf first in pprof, root first here
            out.stacks.push(Stack {
                process,
                frames,
                value,
            });
        }
        out
    }

    /// Folded stacks (`process;root;…;leaf count`), sorted, one line per distinct stack: the
    /// input format of inferno / flamegraph.pl. Kernel frames end in `_[k]`, Python frames carry
    /// `(file:line)` (one box per line, as py-spy draws them).
    pub fn folded(&self) -> Vec<String> {
        let mut agg: BTreeMap<String, i64> = BTreeMap::new();
        for s in &self.stacks {
            let mut parts: Vec<String> = Vec::with_capacity(s.frames.len() + 1);
            parts.extend(s.process.as_deref().map(sanitize));
            parts.extend(s.frames.iter().map(folded_frame));
            let key = if parts.is_empty() {
                "[unknown]".to_owned()
            } else {
                parts.join(";")
            };
            // Saturating, as `total` is: a profile's values are anyone's numbers.
            let count = agg.entry(key).or_default();
            *count = count.saturating_add(s.value);
        }
        agg.into_iter().map(|(k, v)| format!("{k} {v}")).collect()
    }

    /// Self and total value per function (name and file), hottest (by self) first. A function
    /// counts once per stack in `total` (recursion); its location is its smallest line seen (a
    /// stable place near its start), else its mapping's file.
    pub fn top(&self) -> Vec<TopRow> {
        #[derive(Default)]
        struct Acc<'a> {
            self_: i64,
            total: i64,
            line: i64,
            module: &'a str,
        }
        let mut acc: HashMap<(&str, &str), Acc> = HashMap::new();
        for s in &self.stacks {
            let mut seen: HashSet<(&str, &str)> = HashSet::new();
            let self_at = if self.wait_sites {
                s.frames
                    .iter()
                    .rposition(|f| f.module == mappings::PYTHON)
                    .or_else(|| s.frames.iter().rposition(|f| f.module != mappings::KERNEL))
                    .unwrap_or(s.frames.len().saturating_sub(1))
            } else {
                s.frames.len().saturating_sub(1)
            };
            for (i, f) in s.frames.iter().enumerate() {
                let key = (f.function.as_str(), f.file.as_str());
                let e = acc.entry(key).or_default();
                if seen.insert(key) {
                    e.total = e.total.saturating_add(s.value);
                }
                if i == self_at {
                    e.self_ = e.self_.saturating_add(s.value);
                }
                if f.line > 0 && (e.line == 0 || f.line < e.line) {
                    e.line = f.line;
                }
                if e.module.is_empty() {
                    e.module = &f.module;
                }
            }
        }
        let total = self.total.max(1) as f64;
        let mut rows: Vec<TopRow> = acc
            .into_iter()
            .map(|((function, file), a)| TopRow {
                function: function.to_owned(),
                location: match (file.is_empty(), a.line) {
                    (true, _) => (!a.module.is_empty()).then(|| a.module.to_owned()),
                    (false, 0) => Some(file.to_owned()),
                    (false, l) => Some(format!("{file}:{l}")),
                },
                self_value: a.self_,
                total_value: a.total,
                self_percent: round2(a.self_ as f64 * 100.0 / total),
                total_percent: round2(a.total as f64 * 100.0 / total),
            })
            .collect();
        rows.sort_by(|a, b| {
            b.self_value
                .cmp(&a.self_value)
                .then(b.total_value.cmp(&a.total_value))
                .then_with(|| a.function.cmp(&b.function))
                .then_with(|| a.location.cmp(&b.location))
        });
        rows
    }
}

/// `name (pid)` of a sample from its labels (`?` when the name is missing).
fn process(p: &Profile, s: &crate::Sample) -> Option<String> {
    let label = |key: &str| s.label.iter().find(|l| p.str(l.key) == key);
    let pid = label(labels::PID)?.num;
    let name = label(labels::PROCESS_NAME).map_or("?", |l| p.str(l.str));
    Some(format!("{name} ({pid})"))
}

fn folded_frame(f: &Frame) -> String {
    // A frame without a name would be an empty box, and a stack of only such frames a line
    // that inferno cannot read (its count taken for the stack): both show as `[unknown]`.
    let mut s = if f.function.trim().is_empty() {
        "[unknown]".to_owned()
    } else {
        sanitize(&f.function)
    };
    if f.module == mappings::KERNEL {
        s.push_str("_[k]");
    } else if f.module == mappings::PYTHON && f.line > 0 && !f.file.is_empty() {
        s.push_str(&sanitize(&format!(" ({}:{})", f.file, f.line)));
    }
    s
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `;` separates frames and line breaks separate stacks in the folded format.
fn sanitize(name: &str) -> String {
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

/// One row of a top table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopRow {
    pub function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    pub self_value: i64,
    pub total_value: i64,
    pub self_percent: f64,
    pub total_percent: f64,
}

/// A top table: the JSON document `GET /v1/profiles/{ns}/{name}/top` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopReport {
    pub unit: String,
    pub total: i64,
    pub rows: Vec<TopRow>,
}

impl TopReport {
    /// The first `limit` rows of `stacks`' top table.
    pub fn new(stacks: &Stacks, limit: usize) -> Self {
        let mut rows = stacks.top();
        rows.truncate(limit);
        Self {
            unit: stacks.unit.clone(),
            total: stacks.total,
            rows,
        }
    }

    /// A fixed-width text table, as `kprof-agent record` and `kubectl kprof top` print it.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>7} {:>7}  {:<48} LOCATION",
            "SELF%", "TOTAL%", "FUNCTION"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:>6.2}% {:>6.2}%  {:<48} {}",
                r.self_percent,
                r.total_percent,
                ellipsize(&r.function, 48),
                r.location.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(s, "total {} ({})", self.total, self.unit);
        s
    }
}

fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let keep: String = s.chars().take(max - 1).collect();
        format!("{keep}…")
    }
}

/// Render an interactive flame graph (search, zoom: inferno's SVG carries its own script).
pub fn flamegraph_svg(stacks: &Stacks, title: &str) -> Vec<u8> {
    let lines = stacks.folded();
    let mut opts = Options::default();
    opts.title = title.to_owned();
    opts.subtitle = Some(format!("{} {}", stacks.total, stacks.unit));
    opts.count_name = stacks
        .unit
        .rsplit('/')
        .next()
        .filter(|u| !u.is_empty())
        .unwrap_or("samples")
        .to_owned();
    render(&mut opts, &lines)
}

fn render(opts: &mut Options<'_>, lines: &[String]) -> Vec<u8> {
    opts.deterministic = true;
    let mut out = Vec::new();
    if lines.is_empty()
        || flamegraph::from_lines(opts, lines.iter().map(String::as_str), &mut out).is_err()
    {
        return empty_svg(&opts.title);
    }
    out
}

/// A valid SVG that says there is nothing to show (inferno refuses empty input).
pub fn empty_svg(title: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\
<text x=\"600\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{}</text>\
<text x=\"600\" y=\"48\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">no samples</text></svg>\n",
        html_escape(title)
    )
    .into_bytes()
}

/// A differential flame graph of `after` against `before`: the shape is `after`'s, red frames
/// grew and blue ones shrank (normalised to the same total first).
pub fn diff_svg(before: &Stacks, after: &Stacks, title: &str) -> Vec<u8> {
    let (a, b) = (before.folded().join("\n"), after.folded().join("\n"));
    let mut diff = Vec::new();
    let dopts = inferno::differential::Options {
        normalize: true,
        ..Default::default()
    };
    if inferno::differential::from_readers(dopts, a.as_bytes(), b.as_bytes(), &mut diff).is_err() {
        return empty_svg(title);
    }
    let text = String::from_utf8_lossy(&diff);
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut opts = Options::default();
    opts.title = title.to_owned();
    opts.subtitle = Some("red: grew, blue: shrank (after vs before, normalised)".to_owned());
    render(&mut opts, &lines)
}

/// One row of [`growth`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Growth {
    pub function: String,
    pub before_self_percent: f64,
    pub after_self_percent: f64,
    pub delta_percent: f64,
}

/// Functions whose self share grew most from `before` to `after`, biggest growth first.
pub fn growth(before: &Stacks, after: &Stacks) -> Vec<Growth> {
    let self_shares = |s: &Stacks| {
        let mut m: HashMap<String, f64> = HashMap::new();
        for r in s.top() {
            *m.entry(r.function).or_default() += r.self_percent;
        }
        m
    };
    let (a, b) = (self_shares(before), self_shares(after));
    let names: HashSet<&String> = a.keys().chain(b.keys()).collect();
    let mut rows: Vec<Growth> = names
        .into_iter()
        .map(|n| {
            let (x, y) = (
                a.get(n).copied().unwrap_or(0.0),
                b.get(n).copied().unwrap_or(0.0),
            );
            Growth {
                function: n.clone(),
                before_self_percent: x,
                after_self_percent: y,
                delta_percent: round2(y - x),
            }
        })
        .filter(|g| g.before_self_percent != 0.0 || g.after_self_percent != 0.0)
        .collect();
    rows.sort_by(|x, y| {
        y.delta_percent
            .total_cmp(&x.delta_percent)
            .then(x.function.cmp(&y.function))
    });
    rows
}

/// Escape text for HTML/XML.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Label, Line, Sample,
        builder::{Builder, MappingSpec},
        merge::synthetic,
    };

    fn stacks() -> Stacks {
        let p = synthetic(
            &[
                (&["main", "app.handle", "app.work"], 6),
                (&["main", "app.handle"], 2),
                (&["main", "app.idle"], 2),
            ],
            1,
            1,
        );
        Stacks::from_profile(&p, 0)
    }

    /// A profile as the agent writes it: process labels, a kernel frame, a Python frame, a
    /// native frame without debug info, recursion.
    fn agent_like() -> Profile {
        let mut b = Builder::new();
        let kernel = b.mapping(MappingSpec {
            filename: mappings::KERNEL,
            ..Default::default()
        });
        let python = b.mapping(MappingSpec {
            filename: mappings::PYTHON,
            ..Default::default()
        });
        let libc = b.mapping(MappingSpec {
            filename: "/usr/lib/libc.so.6",
            ..Default::default()
        });
        let loc = |b: &mut Builder, m, name: &str, file: &str, line| {
            let function_id = b.function(name, name, file, 0);
            b.location(
                m,
                0,
                vec![Line {
                    function_id,
                    line,
                    column: 0,
                }],
                false,
            )
        };
        let sys = loc(&mut b, kernel, "do_syscall_64", "", 0);
        let read = loc(&mut b, libc, "read", "", 0);
        let fib9 = loc(&mut b, python, "fib", "app.py", 9);
        let fib7 = loc(&mut b, python, "fib", "app.py", 7);
        let main = loc(&mut b, python, "a;b", "app.py", 20);
        let (pid, name) = (b.string(labels::PID), b.string(labels::PROCESS_NAME));
        let app = b.string("app");
        let label = vec![
            Label {
                key: pid,
                num: 7,
                ..Default::default()
            },
            Label {
                key: name,
                str: app,
                ..Default::default()
            },
        ];
        let ty = b.value_type("samples", "count");
        b.finish(Profile {
            sample_type: vec![ty],
            sample: vec![
                Sample {
                    location_id: vec![sys, read, fib9, fib7, main],
                    value: vec![3],
                    label: label.clone(),
                },
                Sample {
                    location_id: vec![fib9, main],
                    value: vec![1],
                    label,
                },
                Sample {
                    location_id: vec![main],
                    value: vec![1],
                    label: vec![],
                },
            ],
            ..Default::default()
        })
    }

    #[test]
    fn top_self_and_total() {
        let t = stacks().top();
        assert_eq!(t[0].function, "app.work");
        assert_eq!(t[0].self_percent, 60.0);
        let handle = t.iter().find(|r| r.function == "app.handle").unwrap();
        assert_eq!((handle.self_percent, handle.total_percent), (20.0, 80.0));
        let main = t.iter().find(|r| r.function == "main").unwrap();
        assert_eq!((main.self_percent, main.total_percent), (0.0, 100.0));
        assert_eq!(t[0].location.as_deref(), Some("app.py:12"));
        let self_sum: f64 = t.iter().map(|r| r.self_percent).sum();
        assert!((self_sum - 100.0).abs() < 1e-9, "self sums to 100%");
    }

    #[test]
    fn top_counts_recursion_once_and_locates_by_smallest_line_or_module() {
        let t = Stacks::from_profile(&agent_like(), 0).top();
        let fib = t.iter().find(|r| r.function == "fib").unwrap();
        assert_eq!(
            (fib.self_value, fib.total_value),
            (1, 4),
            "recursion counts once"
        );
        assert_eq!(
            fib.location.as_deref(),
            Some("app.py:7"),
            "smallest line seen"
        );
        let read = t.iter().find(|r| r.function == "read").unwrap();
        assert_eq!(read.location.as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!(t[0].function, "do_syscall_64");
        let table = TopReport::new(&Stacks::from_profile(&agent_like(), 0), 10).table();
        assert!(table.lines().next().unwrap().contains("SELF%"), "{table}");
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .starts_with(" 60.00%  60.00%  do_syscall_64 "),
            "{table}"
        );
        assert!(table.ends_with("total 5 (samples/count)\n"), "{table}");
    }

    #[test]
    fn wall_lock_and_memory_tops_rank_the_python_site_not_the_scheduler_or_allocator() {
        for kind in ["contentions", "alloc_space"] {
            let mut p = agent_like();
            p.string_table.push(kind.into());
            p.sample_type[0].r#type = (p.string_table.len() - 1) as i64;
            assert!(Stacks::from_profile(&p, 0).wait_sites, "{kind}");
        }
        let mut p = agent_like();
        p.string_table.push("wall".into());
        p.sample_type[0].r#type = (p.string_table.len() - 1) as i64;
        let s = Stacks::from_profile(&p, 0);
        assert!(s.wait_sites);
        let t = s.top();
        // The blocked stack (kernel, libc, Python) counts as self of its innermost Python frame.
        assert_eq!((t[0].function.as_str(), t[0].self_value), ("fib", 4));
        let sys = t.iter().find(|r| r.function == "do_syscall_64").unwrap();
        assert_eq!((sys.self_value, sys.total_value), (0, 3));
        assert!(!Stacks::from_profile(&agent_like(), 0).wait_sites);
    }

    #[test]
    fn folded_marks_processes_kernel_and_python_lines() {
        let s = Stacks::from_profile(&agent_like(), 0);
        assert_eq!(
            s.folded(),
            vec![
                "a:b (app.py:20) 1",
                "app (7);a:b (app.py:20);fib (app.py:7);fib (app.py:9);read;do_syscall_64_[k] 3",
                "app (7);a:b (app.py:20);fib (app.py:9) 1",
            ]
        );
    }

    #[test]
    fn folded_and_svg() {
        let s = stacks();
        assert_eq!(
            s.folded(),
            vec![
                "main;app.handle 2",
                "main;app.handle;app.work 6",
                "main;app.idle 2"
            ]
        );
        let svg = String::from_utf8(flamegraph_svg(&s, "t")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("app.work"));
        let empty = String::from_utf8(flamegraph_svg(&Stacks::default(), "none")).unwrap();
        assert!(empty.contains("no samples") && empty.contains("none"));
    }

    #[test]
    fn growth_and_diff() {
        let before = stacks();
        let p = synthetic(
            &[
                (&["main", "app.handle", "app.work"], 2),
                (&["main", "app.idle"], 8),
            ],
            1,
            1,
        );
        let after = Stacks::from_profile(&p, 0);
        let g = growth(&before, &after);
        assert_eq!(g[0].function, "app.idle");
        assert_eq!(g[0].delta_percent, 60.0);
        let svg = String::from_utf8(diff_svg(&before, &after, "diff")).unwrap();
        assert!(svg.contains("app.idle"));
    }

    /// Fuzzing (pprof_views): two samples of one stack whose values add past i64::MAX
    /// overflowed the folded stacks' and the top table's sums (a panic with overflow checks,
    /// a wrapped negative count without). They saturate, as the total does.
    #[test]
    fn huge_values_saturate_in_folded_and_top() {
        let mut p = synthetic(
            &[(&["main", "app.work"], 1), (&["main", "app.work"], 1)],
            1,
            1,
        );
        for s in &mut p.sample {
            s.value = vec![i64::MAX, i64::MAX];
        }
        let s = Stacks::from_profile(&p, 0);
        assert_eq!(s.total, i64::MAX);
        assert_eq!(s.folded(), vec![format!("main;app.work {}", i64::MAX)]);
        let top = s.top();
        assert_eq!(top[0].self_value, i64::MAX);
        assert!(top.iter().all(|r| r.total_value == i64::MAX));
        assert!(!flamegraph_svg(&s, "t").is_empty());
        assert!(!diff_svg(&s, &s, "t").is_empty());
    }

    /// Fuzzing (pprof_views): a 250 KB profile whose one sample repeats a location with a
    /// 100 KB function name 150,000 times asked for 15 GB of frames (and as much again for the
    /// folded stacks). The stacks stop at MAX_STACKS_BYTES; what is left is counted in one
    /// truncated stack, and the total still adds up.
    #[test]
    fn long_names_in_deep_stacks_are_truncated_not_copied_without_end() {
        let long = "f".repeat(1 << 20);
        let deep: Vec<&str> = vec![long.as_str(); 100];
        let p = synthetic(
            &[(&["main", "app.work"], 1), (&deep, 2), (&["main"], 4)],
            1,
            1,
        );
        let s = Stacks::from_profile(&p, 0);
        assert_eq!(s.total, 7);
        assert_eq!(s.stacks.len(), 2);
        assert_eq!(s.stacks[0].frames.len(), 2);
        assert_eq!(s.stacks[1].frames[0].function, TRUNCATED);
        assert_eq!(s.stacks[1].value, 6);
        let held: usize = s
            .stacks
            .iter()
            .flat_map(|s| &s.frames)
            .map(|f| f.function.len() + f.file.len())
            .sum();
        assert!(held <= MAX_STACKS_BYTES);
        assert_eq!(
            s.folded(),
            vec![
                "[truncated: more stacks than kprof shows] 6",
                "main;app.work 1"
            ]
        );
    }

    /// Fuzzing (pprof_views, crash-a1088dff): a stack whose frames have no name folded to
    /// " 2", which inferno trims to "2" and drops: the flame graph showed 11 of 13 samples.
    #[test]
    fn nameless_frames_fold_to_unknown_and_count_in_the_flame_graph() {
        let p = synthetic(&[(&[""], 2), (&["", " "], 4), (&["main"], 1)], 1, 1);
        let s = Stacks::from_profile(&p, 0);
        assert_eq!(
            s.folded(),
            vec!["[unknown] 2", "[unknown];[unknown] 4", "main 1"]
        );
        let svg = String::from_utf8(flamegraph_svg(&s, "t")).unwrap();
        assert!(svg.contains("<title>all (7 count, 100%)</title>"), "{svg}");
    }
}
