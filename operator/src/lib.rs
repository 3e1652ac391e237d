//! The kprof operator.
