//! The operator's two controllers.

pub mod daemonset;
pub mod target;
