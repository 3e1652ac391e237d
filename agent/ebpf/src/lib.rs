#![no_std]
//! Empty library target: lets the agent name this package as a build dependency for rebuilds.
