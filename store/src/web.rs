//! The store's web page: server-rendered HTML, no script of its own (the flame graphs are
//! inferno's SVGs, which carry their own search and zoom). One namespace per page, served by the
//! aggregated API (`/apis/data.kprof.io/v1alpha1/namespaces/<ns>/profiles`), so the API server
//! decides who sees it; every link is relative so that it works the same through `kubectl proxy`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, RawQuery, State as AxState};
use axum::response::{Html, IntoResponse, Response};
use kprof_crds::{Profile, ProfilingTarget};
use kube::Api;
use kube::api::ListParams;

use super::State;
use super::access::Reader;
use super::api::check_read;
use super::server::{load_stacks, query_get, query_pairs, split_ref};
use kprof_pprof::views::{self, TopReport, html_escape as esc};

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}\
td,th{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.9em}th{background:#f4f4f4}\
a{color:#0645ad}form.filter input{margin-right:.5em}.num{text-align:right}object{width:100%;border:1px solid #ddd}\
.warn{color:#a60}";

fn page(title: &str, body: &str) -> Response {
    Html(format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        t = esc(title)
    ))
    .into_response()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn age(p: &Profile) -> String {
    p.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// `…/namespaces/{ns}/profiles`: the namespace's targets and profiles, newest first (`?target=`
/// filters); with `?a=&b=`, the diff of those two.
pub(crate) async fn index(
    AxState(st): AxState<Arc<State>>,
    Extension(reader): Extension<Reader>,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let q = query_pairs(&q);
    if let (Some(a), Some(b)) = (query_get(&q, "a"), query_get(&q, "b")) {
        return diff_page(&st, &reader, &a, &b).await;
    }
    let target = query_get(&q, "target");
    let targets: Api<ProfilingTarget> = Api::namespaced(st.client.clone(), &ns);
    let profiles: Api<Profile> = Api::namespaced(st.client.clone(), &ns);
    let mut lp = ListParams::default();
    if let Some(t) = &target {
        lp = lp.labels(&format!("{}={t}", kprof_crds::labels::TARGET));
    }
    let mut b = format!("<h1>kprof profiles in {}</h1>", esc(&ns));
    let _ = write!(
        b,
        "<form class=\"filter\" method=\"get\" action=\"profiles\">target <input name=\"target\" value=\"{}\"><button>filter</button></form>",
        esc(target.as_deref().unwrap_or(""))
    );
    match targets.list(&ListParams::default()).await {
        Ok(list) => {
            b.push_str("<h2>Profiling targets</h2><table><tr><th>namespace</th><th>name</th><th>phase</th><th>types</th><th>pods</th><th>profiles</th></tr>");
            for t in list.items.iter().filter(|t| {
                target
                    .as_ref()
                    .is_none_or(|x| t.metadata.name.as_ref() == Some(x))
            }) {
                let tns = t.metadata.namespace.clone().unwrap_or_default();
                let name = t.metadata.name.clone().unwrap_or_default();
                let status = t.status.clone().unwrap_or_default();
                let types: Vec<String> =
                    t.spec.profile_types.iter().map(|p| p.to_string()).collect();
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td><a href=\"profiles?target={}\">{}</a></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(&tns),
                    enc(&name),
                    esc(&name),
                    esc(&status.phase.map(|p| format!("{p:?}")).unwrap_or_default()),
                    esc(&types.join(",")),
                    status.matched_pods,
                    status.profiles_written
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"warn\">cannot list ProfilingTargets: {}</p>",
                esc(&e.to_string())
            );
        }
    }
    match profiles.list(&lp).await {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by(|a, b| {
                b.spec
                    .window_end
                    .0
                    .cmp(&a.spec.window_end.0)
                    .then(a.metadata.name.cmp(&b.metadata.name))
            });
            let shown = items.len().min(500);
            let _ = write!(b, "<h2>Profiles ({} shown of {})</h2>", shown, items.len());
            b.push_str("<form method=\"get\" action=\"profiles\"><p>Pick a <b>before</b> (a) and an <b>after</b> (b) profile, then <button>diff</button></p>");
            b.push_str("<table><tr><th>a</th><th>b</th><th>namespace</th><th>name</th><th>target</th><th>pod/container</th><th>type</th><th>window end</th><th>samples</th><th>top</th></tr>");
            for p in items.iter().take(shown) {
                let pns = p.metadata.namespace.clone().unwrap_or_default();
                let name = p.metadata.name.clone().unwrap_or_default();
                let r = esc(&format!("{pns}/{name}"));
                let _ = write!(
                    b,
                    "<tr><td><input type=\"radio\" name=\"a\" value=\"{r}\"></td><td><input type=\"radio\" name=\"b\" value=\"{r}\"></td><td>{}</td><td><a href=\"profiles/{}/ui\">{}</a></td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(&pns),
                    enc(&name),
                    esc(&name),
                    esc(&p.spec.target),
                    esc(&p.spec.pod),
                    esc(&p.spec.container),
                    p.spec.profile_type,
                    esc(&p.spec.window_end.0.to_string()),
                    p.spec.samples,
                    esc(&p.spec.top)
                );
            }
            b.push_str("</table></form>");
        }
        Err(e) => {
            let _ = write!(
                b,
                "<p class=\"warn\">cannot list Profiles: {}</p>",
                esc(&e.to_string())
            );
        }
    }
    st.metrics.read("page", b.len());
    page("kprof", &b)
}

fn top_table(b: &mut String, report: &TopReport) {
    b.push_str("<table><tr><th>self %</th><th>total %</th><th>function</th><th>location</th></tr>");
    for r in &report.rows {
        let _ = write!(
            b,
            "<tr><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td><td>{}</td><td>{}</td></tr>",
            r.self_percent,
            r.total_percent,
            esc(&r.function),
            esc(r.location.as_deref().unwrap_or("-"))
        );
    }
    b.push_str("</table>");
}

/// `…/namespaces/{ns}/profiles/{name}/ui`: summary, interactive flame graph, top table.
pub(crate) async fn profile_page(
    AxState(st): AxState<Arc<State>>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    let (p, stacks) = match load_stacks(&st, &ns, &name, None).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let s = &p.spec;
    let mut b = format!(
        "<p><a href=\"../../profiles\">all profiles of the namespace</a></p><h1>{}/{}</h1>",
        esc(&ns),
        esc(&name)
    );
    let _ = write!(
        b,
        "<table><tr><th>target</th><td>{}</td></tr><tr><th>pod / container</th><td>{} / {}</td></tr><tr><th>node</th><td>{}</td></tr>\
<tr><th>runtime</th><td>{}</td></tr><tr><th>type</th><td>{}</td></tr><tr><th>window</th><td>{} – {}</td></tr>\
<tr><th>samples</th><td>{} ({} lost, {} Hz, {:.2} cores)</td></tr><tr><th>created</th><td>{}</td></tr></table>",
        esc(&s.target),
        esc(&s.pod),
        esc(&s.container),
        esc(&s.node),
        esc(&s.runtime),
        s.profile_type,
        esc(&s.window_start.0.to_string()),
        esc(&s.window_end.0.to_string()),
        s.samples,
        s.lost_samples,
        s.sample_hz,
        s.cpu_cores,
        esc(&age(&p))
    );
    for w in &s.warnings {
        let _ = write!(b, "<p class=\"warn\">⚠ {}</p>", esc(w));
    }
    // Relative to `…/profiles/{name}/ui`: the sibling subresources.
    let summary = if s.artifacts.summary.is_some() {
        " · <a href=\"summary\">figures over time (JSON)</a>"
    } else {
        ""
    };
    // A kind with several views in bytes or time (memory: touched, held, mapped, mapped and
    // held) links a flame graph of each.
    let views: Vec<String> = kprof_pprof::types::by_name(&s.profile_type.to_string())
        .map(|k| {
            k.sample_types
                .iter()
                .filter(|t| t.unit != "count")
                .map(|t| format!("<a href=\"flamegraph?sampleIndex={0}\">{0}</a>", t.r#type))
                .collect()
        })
        .unwrap_or_default();
    let views = if views.len() > 1 {
        format!(" ({})", views.join(" · "))
    } else {
        String::new()
    };
    let _ = write!(
        b,
        "<p>Download: <a href=\"pprof\">pprof</a> · <a href=\"flamegraph\">flame graph</a>{views} · <a href=\"top\">top (JSON)</a>{summary}. \
Click a frame to zoom, Ctrl-F to search.</p><object id=\"flamegraph\" type=\"image/svg+xml\" data=\"flamegraph\"></object><h2>Top functions</h2>"
    );
    top_table(&mut b, &TopReport::new(&stacks, 30));
    st.metrics.read("page", b.len());
    page(&format!("{ns}/{name}"), &b)
}

/// The diff of `a` (before) and `b` (after), both `ns/name`, each checked for `reader`: the
/// namespace of the page says nothing about theirs.
async fn diff_page(st: &State, reader: &Reader, a: &str, b_ref: &str) -> Response {
    let (Some(ra), Some(rb)) = (split_ref(a), split_ref(b_ref)) else {
        return page("diff", "<p>a and b must be namespace/name.</p>");
    };
    for (ns, name) in [&ra, &rb] {
        if let Err(r) = check_read(st, reader, ns, name).await {
            return r;
        }
    }
    let before = match load_stacks(st, &ra.0, &ra.1, None).await {
        Ok(x) => x.1,
        Err(r) => return r,
    };
    let after = match load_stacks(st, &rb.0, &rb.1, None).await {
        Ok(x) => x.1,
        Err(r) => return r,
    };
    let mut b = format!(
        "<p><a href=\"profiles\">all profiles of the namespace</a></p><h1>{} → {}</h1>",
        esc(a),
        esc(b_ref)
    );
    let _ = write!(
        b,
        "<p>The shape is <i>b</i>'s; red frames grew, blue ones shrank (normalised to the same total).</p>\
<object id=\"flamegraph\" type=\"image/svg+xml\" data=\"../{}/profiles/{}/diff?base={}\"></object><h2>Grew most (self %)</h2>\
<table><tr><th>function</th><th>a</th><th>b</th><th>Δ</th></tr>",
        enc(&rb.0),
        enc(&rb.1),
        enc(a)
    );
    for g in views::growth(&before, &after).iter().take(20) {
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:.2}</td><td class=\"num\">{:+.2}</td></tr>",
            esc(&g.function),
            g.before_self_percent,
            g.after_self_percent,
            g.delta_percent
        );
    }
    b.push_str("</table>");
    st.metrics.read("page", b.len());
    page("diff", &b)
}
