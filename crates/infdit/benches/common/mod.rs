//! Helpers shared by the benchmarks.

use std::time::{Duration, Instant};

/// Deterministic uniform values in [-amp, amp].
pub fn lcg(seed: u64, len: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// GFLOP/s of `f` doing `flops` a call: one warm-up call, then calls for at least 1.5 s (and 3).
pub fn gflops(flops: f64, f: impl Fn()) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while n < 3 || t.elapsed() < Duration::from_millis(1500) {
        f();
        n += 1;
    }
    flops * n as f64 / t.elapsed().as_secs_f64() / 1e9
}
