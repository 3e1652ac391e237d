//! Label selectors: the checks the CRD schema cannot make (matching pods is
//! `kprof_crds::selection`'s).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::Selector;

/// Check `sel` as the API server checks a selector in a Deployment (operators, values, keys),
/// with messages that name the offending part. Matching is `kprof_crds::selection`'s.
pub fn check(sel: &LabelSelector) -> Result<(), String> {
    for (k, v) in sel.match_labels.iter().flatten() {
        check_key(k).map_err(|e| format!("matchLabels key {k:?}: {e}"))?;
        check_value(v).map_err(|e| format!("matchLabels[{k:?}] value {v:?}: {e}"))?;
    }
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("matchExpressions[{i}] (key {:?})", req.key);
        check_key(&req.key).map_err(|e| format!("{at}: {e}"))?;
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "{at}: operator {} needs at least one value",
                    req.operator
                ));
            }
            "In" | "NotIn" => {
                for v in values {
                    check_value(v).map_err(|e| format!("{at}: value {v:?}: {e}"))?;
                }
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!("{at}: operator {} takes no values", req.operator));
            }
            "Exists" | "DoesNotExist" => {}
            other => {
                return Err(format!(
                    "{at}: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)"
                ));
            }
        }
    }
    let selector = Selector::try_from(sel.clone()).map_err(|e| e.0)?;
    if selector.selects_all() {
        return Err("the selector is empty and would select every pod".into());
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A label value: empty, or at most 63 characters `[A-Za-z0-9_.-]` beginning and ending with an
/// alphanumeric.
fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 {
        return Err("longer than 63 characters".into());
    }
    let ends_ok = v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ends_ok || !v.chars().all(is_name_char) {
        return Err(
            "must be alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric"
                .into(),
        );
    }
    Ok(())
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name like a value (non-empty).
fn check_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if name.is_empty() {
        return Err("the name part is empty".into());
    }
    check_value(name)?;
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("prefix {p:?} is not a DNS subdomain"));
        }
    }
    Ok(())
}

/// A light check of a selector string as `kubectl -l` takes it (the API server is the
/// authority): no empty terms, balanced parentheses.
pub fn check_selector_string(s: &str) -> Result<(), String> {
    let mut depth = 0i32;
    let mut term = String::new();
    for c in s.chars().chain(std::iter::once(',')) {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                if term.trim().is_empty() {
                    return Err(format!("{s:?} has an empty term"));
                }
                term.clear();
                continue;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("{s:?} has unbalanced parentheses"));
        }
        term.push(c);
    }
    if depth != 0 {
        return Err(format!("{s:?} has unbalanced parentheses"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(yaml: &str) -> LabelSelector {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn what_the_schema_cannot_check_is_refused_with_a_reason() {
        let cases = [
            (
                "matchExpressions: [{key: app, operator: In}]",
                "needs at least one value",
            ),
            (
                "matchExpressions: [{key: app, operator: Exists, values: [x]}]",
                "takes no values",
            ),
            (
                "matchExpressions: [{key: app, operator: Equals, values: [x]}]",
                "unknown operator",
            ),
            ("matchLabels: {'bad key!': x}", "matchLabels key"),
            ("matchLabels: {app: '-x'}", "value"),
            ("matchLabels: {'Example.com/app': x}", "DNS subdomain"),
            ("{}", "select every pod"),
        ];
        for (yaml, want) in cases {
            let err = check(&sel(yaml)).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(check(&sel("matchLabels: {example.com/app: x}")).is_ok());
    }

    #[test]
    fn selector_strings() {
        assert!(check_selector_string("a=b,c in (d,e)").is_ok());
        assert!(check_selector_string("a=b,,c").is_err());
        assert!(check_selector_string("a in (b").is_err());
    }
}
