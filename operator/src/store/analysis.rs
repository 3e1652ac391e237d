//! What users look at: the top table, flame graphs and differential flame graphs, computed from
//! a pprof [`Profile`]. Shared by the store (rendering on read, the web page) and `kubectl-kprof`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use inferno::flamegraph::{self, Options};
use serde::{Deserialize, Serialize};

use super::pprof::Profile;

/// One frame: function name and, when known, `file:line`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    pub file: String,
    pub line: i64,
}

/// The stacks of a profile (root first) with their value for one sample type.
#[derive(Clone, Debug, Default)]
pub struct Stacks {
    pub stacks: Vec<(Vec<Frame>, i64)>,
    pub total: i64,
    /// `type/unit` of the value, e.g. `cpu/nanoseconds`.
    pub unit: String,
}

impl Stacks {
    /// Resolve every sample of `p` into frames, with the value at `value_index`.
    pub fn from_profile(p: &Profile, value_index: usize) -> Self {
        let functions: HashMap<u64, _> = p.function.iter().map(|f| (f.id, f)).collect();
        let locations: HashMap<u64, _> = p.location.iter().map(|l| (l.id, l)).collect();
        let mut out = Stacks {
            unit: p
                .sample_types()
                .get(value_index)
                .cloned()
                .unwrap_or_default(),
            ..Default::default()
        };
        for s in &p.sample {
            let value = s.value.get(value_index).copied().unwrap_or(0);
            if value == 0 {
                continue;
            }
            let mut frames = Vec::new();
            for id in &s.location_id {
                let Some(loc) = locations.get(id) else {
                    continue;
                };
                if loc.line.is_empty() {
                    frames.push(Frame {
                        function: format!("0x{:x}", loc.address),
                        file: String::new(),
                        line: 0,
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
                            (name.to_string(), p.str(f.filename).to_string())
                        }
                        None => ("?".to_string(), String::new()),
                    };
                    frames.push(Frame {
                        function,
                        file,
                        line: l.line,
                    });
                }
            }
            frames.reverse(); // leaf first in pprof, root first here
            out.total = out.total.saturating_add(value);
            out.stacks.push((frames, value));
        }
        out
    }

    /// Folded stacks (`root;caller;leaf count`), the input format of inferno / flamegraph.pl.
    pub fn folded(&self) -> Vec<String> {
        let mut agg: HashMap<String, i64> = HashMap::new();
        for (frames, v) in &self.stacks {
            let key = frames
                .iter()
                .map(|f| sanitize(&f.function))
                .collect::<Vec<_>>()
                .join(";");
            let key = if key.is_empty() {
                "[unknown]".to_string()
            } else {
                key
            };
            *agg.entry(key).or_default() += v;
        }
        let mut lines: Vec<String> = agg.into_iter().map(|(k, v)| format!("{k} {v}")).collect();
        lines.sort();
        lines
    }

    /// Self and total value per function, hottest (by self) first.
    pub fn top(&self) -> Vec<TopRow> {
        struct Acc {
            self_: i64,
            total: i64,
            lines: HashMap<(String, i64), i64>,
        }
        let mut acc: HashMap<&str, Acc> = HashMap::new();
        for (frames, v) in &self.stacks {
            let mut seen: HashSet<&str> = HashSet::new();
            for (i, f) in frames.iter().enumerate() {
                let e = acc.entry(f.function.as_str()).or_insert_with(|| Acc {
                    self_: 0,
                    total: 0,
                    lines: HashMap::new(),
                });
                if seen.insert(f.function.as_str()) {
                    e.total += v;
                }
                if i + 1 == frames.len() {
                    e.self_ += v;
                }
                *e.lines.entry((f.file.clone(), f.line)).or_default() += v;
            }
        }
        let total = self.total.max(1) as f64;
        let mut rows: Vec<TopRow> = acc
            .into_iter()
            .map(|(function, a)| {
                let ((file, line), _) = a
                    .lines
                    .into_iter()
                    .max_by_key(|(k, v)| (*v, std::cmp::Reverse(k.clone())))
                    .unwrap_or_default();
                let location = match (file.is_empty(), line) {
                    (true, _) => None,
                    (false, 0) => Some(file),
                    (false, l) => Some(format!("{file}:{l}")),
                };
                TopRow {
                    function: function.to_string(),
                    location,
                    self_value: a.self_,
                    total_value: a.total,
                    self_percent: round2(a.self_ as f64 * 100.0 / total),
                    total_percent: round2(a.total as f64 * 100.0 / total),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.self_value
                .cmp(&a.self_value)
                .then(b.total_value.cmp(&a.total_value))
                .then(a.function.cmp(&b.function))
        });
        rows
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Folded-stack frames cannot contain `;` (frame separator) or line breaks; a trailing number
/// after a space would be read as the count, so spaces become `_` only where needed.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == ';' || c == '\n' || c == '\r' {
                '_'
            } else {
                c
            }
        })
        .collect()
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

/// The JSON document `GET /v1/profiles/{ns}/{name}/top` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopReport {
    pub unit: String,
    pub total: i64,
    pub rows: Vec<TopRow>,
}

impl TopReport {
    pub fn new(stacks: &Stacks, limit: usize) -> Self {
        let mut rows = stacks.top();
        rows.truncate(limit);
        Self {
            unit: stacks.unit.clone(),
            total: stacks.total,
            rows,
        }
    }

    /// A fixed-width text table, as `kubectl kprof top` prints it.
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
        s.to_string()
    } else {
        let keep: String = s.chars().take(max - 1).collect();
        format!("{keep}…")
    }
}

/// Render an interactive flame graph (search, zoom: inferno's SVG carries its own script).
pub fn flamegraph_svg(stacks: &Stacks, title: &str) -> Vec<u8> {
    let lines = stacks.folded();
    let mut opts = Options::default();
    opts.title = title.to_string();
    opts.subtitle = Some(format!("{} {}", stacks.total, stacks.unit));
    opts.count_name = stacks
        .unit
        .rsplit('/')
        .next()
        .unwrap_or("samples")
        .to_string();
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
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut opts = Options::default();
    opts.title = title.to_string();
    opts.subtitle = Some("red: grew, blue: shrank (after vs before, normalised)".to_string());
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
    let a: HashMap<String, f64> = before
        .top()
        .into_iter()
        .map(|r| (r.function, r.self_percent))
        .collect();
    let b: HashMap<String, f64> = after
        .top()
        .into_iter()
        .map(|r| (r.function, r.self_percent))
        .collect();
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
    use super::super::pprof::synthetic;
    use super::*;

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
        assert!(empty.contains("no samples"));
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
}
