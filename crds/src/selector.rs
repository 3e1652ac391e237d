//! Label selectors as the API server reads them, for [`crate::selection`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::Selector;

/// The selector (kube's matcher, Kubernetes semantics), or None when it matches nothing here:
/// an empty selector (kprof never profiles a whole namespace by accident; the schema refuses
/// empty selectors too) or one with an unknown operator.
pub(crate) fn parse(selector: &LabelSelector) -> Option<Selector> {
    Selector::try_from(selector.clone())
        .ok()
        .filter(|s| !s.selects_all())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use std::collections::BTreeMap;

    use kube::core::SelectorExt;

    use super::*;

    fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
        parse(selector).is_some_and(|s| s.matches(labels))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).into()).collect()),
        }
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "checkout"), ("tier", "web")])),
            ..Default::default()
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "checkout"), ("tier", "web"), ("x", "y")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "checkout")])));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "checkout"), ("tier", "db")])
        ));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let sel = LabelSelector {
            match_expressions: Some(vec![
                expr("app", "In", &["worker", "worker-canary"]),
                expr("track", "NotIn", &["debug"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
            ..Default::default()
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "worker"), ("team", "a")])
        ));
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "worker-canary"), ("team", "a"), ("track", "ga")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "api"), ("team", "a")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "worker"), ("team", "a"), ("track", "debug")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "worker")])));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "worker"), ("team", "a"), ("legacy", "1")])
        ));
    }

    #[test]
    fn empty_or_unknown_selects_nothing() {
        assert!(!selector_matches(
            &LabelSelector::default(),
            &labels(&[("app", "x")])
        ));
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("app", "Like", &["x"])]),
            ..Default::default()
        };
        assert!(!selector_matches(&sel, &labels(&[("app", "x")])));
    }
}
