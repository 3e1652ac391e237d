//! Rust CPU workload with known hot functions for the kernel tests of kprof-agent.
//! usage: hot-rs SECONDS — about 3/4 of the time in `checksum_pages`, 1/4 in `mix_keys`.
//! Built with `rustc -O -C force-frame-pointers=yes -g`.
use std::{hint::black_box, time::{Duration, Instant}};

#[inline(never)]
fn checksum_pages(seed: u64) -> u64 {
    let mut h = seed;
    for i in 0..3_000_000u64 {
        h = h.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    black_box(h)
}

#[inline(never)]
fn mix_keys(seed: u64) -> u64 {
    let mut h = seed;
    for i in 0..1_000_000u64 {
        h = h.rotate_right(7) ^ i.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    }
    black_box(h)
}

#[inline(never)]
fn run(d: Duration) -> u64 {
    let end = Instant::now() + d;
    let mut acc = 0u64;
    while Instant::now() < end {
        acc ^= checksum_pages(acc);
        acc ^= mix_keys(acc);
    }
    acc
}

fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    black_box(run(Duration::from_secs_f64(secs)));
}
