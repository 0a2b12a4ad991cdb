//! Fused CPU attention against the plain matmul/softmax/matmul version.
//!
//! `cargo bench -p infdit --bench attention` (a filter such as `-- h16` picks cases). Throughput is
//! reported in elements per second where one element is one flop (4 N H Tq Tk d per call), so
//! "Gelem/s" reads as GFLOP/s; a summary line per case is printed as well.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::hint::black_box;
use std::time::Duration;

mod common;

use candle_core::{DType, Device, Tensor};
use common::{gflops, lcg};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use infdit::kernels::attention::{Backend, attention_reference, fused_attention, fused_attention_impl};
use infdit::kernels::{supported_paths, with_path};

fn rand(seed: u64, shape: (usize, usize, usize, usize), amp: f32) -> Tensor {
    Tensor::from_vec(lcg(seed, shape.0 * shape.1 * shape.2 * shape.3, amp), shape, &Device::Cpu).unwrap()
}

/// (name, N, H, Tq, Tk, d)
const CASES: [(&str, usize, usize, usize, usize, usize); 5] = [
    ("uniba_h4_d32", 1, 4, 1024, 4096, 32),
    ("uniba_h16_d80", 1, 16, 1024, 4096, 80),
    ("uniba_h8_d64", 1, 8, 1024, 4096, 64),
    ("cross_h8_d48", 1, 8, 1024, 2304, 48),
    ("clip_h16_d64", 1, 16, 257, 257, 64),
];

fn bench(c: &mut Criterion) {
    for (name, n, h, tq, tk, d) in CASES {
        let q = rand(1, (n, h, tq, d), 3.5);
        let k = rand(2, (n, h, tk, d), 1.7);
        let v = rand(3, (n, h, tk, d), 1.0);
        let qb = q.to_dtype(DType::BF16).unwrap();
        let kb = k.to_dtype(DType::BF16).unwrap();
        let vb = v.to_dtype(DType::BF16).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let flops = 4.0 * (n * h * tq * tk * d) as f64;
        let fused = || drop(black_box(fused_attention(&q, &k, &v, scale).unwrap()));
        let portable = || drop(black_box(fused_attention_impl(&q, &k, &v, scale, Backend::Portable).unwrap()));
        let fused_bf16 = || drop(black_box(fused_attention(&qb, &kb, &vb, scale).unwrap()));
        let reference = || drop(black_box(attention_reference(&q, &k, &v, scale).unwrap()));
        let per_path: Vec<String> = supported_paths()
            .into_iter()
            .map(|p| format!("{p} {:.1}", with_path(p, || gflops(flops, fused)).unwrap()))
            .collect();
        println!(
            "{name} (N={n} H={h} Tq={tq} Tk={tk} d={d}): fused f32 per kernel path: {} GFLOP/s",
            per_path.join(", ")
        );
        println!(
            "{name} (N={n} H={h} Tq={tq} Tk={tk} d={d}): fused {:.1} GFLOP/s, fused bf16 {:.1}, portable {:.1}, reference {:.1}",
            gflops(flops, fused),
            gflops(flops, fused_bf16),
            gflops(flops, portable),
            gflops(flops, reference)
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        g.bench_function("fused", |b| b.iter(fused));
        g.bench_function("fused_bf16", |b| b.iter(fused_bf16));
        g.bench_function("portable", |b| b.iter(portable));
        g.bench_function("reference", |b| b.iter(reference));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
