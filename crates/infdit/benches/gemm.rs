//! Dense layers `x W^T`: candle's matmul in f32 and bf16 against infdit's bf16 kernel (AMX tiles
//! where the CPU has them, else the bf16 dot product; `INFDIT_AMX=0` for the latter); and
//! the single-threaded products of the fast training backward in f32 (the `gemm` crate) and in
//! bf16 on AMX tiles (`train_*` cases, the built-in training config's shapes).
//!
//! `cargo bench -p infdit --bench gemm` (a filter such as `-- fc2` picks cases). Throughput is in
//! elements per second where one element is one flop (2 M N K per call), so "Gelem/s" reads as
//! GFLOP/s; a summary line per case is printed as well. infdit's kernel needs AMX or avx512_bf16
//! (else its column is skipped).
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::hint::black_box;
use std::time::Duration;

mod common;

use candle_core::{DType, Device, Tensor};
use common::{gflops, lcg};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use infdit::kernels::{MatmulPrecision, bf16_gemm};

fn rand(seed: u64, shape: (usize, usize), amp: f32) -> Tensor {
    Tensor::from_vec(lcg(seed, shape.0 * shape.1, amp), shape, &Device::Cpu).unwrap()
}

/// (name, M tokens, K in, N out): the small benchmark config's layers on four 1024-token blocks
/// and one.
const CASES: [(&str, usize, usize, usize); 5] = [
    ("qkv_4096x512x1536", 4096, 512, 1536),
    ("proj_4096x512x512", 4096, 512, 512),
    ("fc1_4096x512x2048", 4096, 512, 2048),
    ("fc2_4096x2048x512", 4096, 2048, 512),
    ("fc1_1024x512x2048", 1024, 512, 2048),
];

fn bench(c: &mut Criterion) {
    for (name, m, k, n) in CASES {
        let x = rand(1, (m, k), 1.0);
        let w = rand(2, (n, k), 0.05);
        let (xb, wb) = (x.to_dtype(DType::BF16).unwrap(), w.to_dtype(DType::BF16).unwrap());
        let flops = 2.0 * (m * n * k) as f64;
        let f32_matmul = || drop(black_box(x.matmul(&w.t().unwrap()).unwrap()));
        let bf16_matmul = || drop(black_box(xb.matmul(&wb.t().unwrap()).unwrap()));
        let kernel = || drop(black_box(bf16_gemm::linear(&xb, &wb, None).unwrap()));
        let dot = bf16_gemm::available();
        let amx = MatmulPrecision::bf16_runs();
        println!(
            "{name}: candle f32 {:.1} GFLOP/s, candle bf16 {:.1}, infdit bf16 kernel {}",
            gflops(flops, f32_matmul),
            gflops(flops, bf16_matmul),
            if amx || dot {
                format!("{:.1} ({})", gflops(flops, kernel), if amx { "AMX tiles" } else { "dot product" })
            } else {
                "n/a (no avx512_bf16)".into()
            }
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        g.bench_function("candle_f32", |b| b.iter(f32_matmul));
        g.bench_function("candle_bf16", |b| b.iter(bf16_matmul));
        if amx || dot {
            g.bench_function("bf16_kernel", |b| b.iter(kernel));
        }
        g.finish();
    }
}

/// (name, m, n, k, A stored transposed, B stored transposed): the products of one training example
/// of the built-in config (hidden 128, MLP 512, 2 heads of 64, 256-token blocks, 512-row tasks).
const TRAIN_CASES: [(&str, usize, usize, usize, bool, bool); 8] = [
    ("train_fwd_up_512x512x128", 512, 512, 128, false, true),
    ("train_fwd_down_512x128x512", 512, 128, 512, false, true),
    ("train_dx_up_512x128x512", 512, 128, 512, false, false),
    ("train_dw_up_256x128x1024", 256, 128, 1024, true, false),
    ("train_dw_down_128x512x1024", 128, 512, 1024, true, false),
    ("train_attn_qk_256x1024x64", 256, 1024, 64, false, true),
    ("train_attn_pv_256x64x1024", 256, 64, 1024, false, false),
    ("train_attn_dv_1024x64x256", 1024, 64, 256, true, false),
];

fn bench_training(c: &mut Criterion) {
    let amx = MatmulPrecision::bf16_runs();
    for (name, m, n, k, at, bt) in TRAIN_CASES {
        let (a, b) = (lcg(1, m * k, 1.0), lcg(2, k * n, 1.0));
        let (a, b) = (&a, &b);
        let flops = 2.0 * (m * n * k) as f64;
        let run = |p: MatmulPrecision| {
            let out = std::cell::RefCell::new(vec![0f32; m * n]);
            move || {
                p.matmul(m, n, k, a, at, b, bt, &mut out.borrow_mut(), false);
                black_box(&out);
            }
        };
        println!(
            "{name}: f32 {:.1} GFLOP/s, bf16 on AMX {}",
            gflops(flops, run(MatmulPrecision::F32)),
            if amx { format!("{:.1}", gflops(flops, run(MatmulPrecision::Bf16))) } else { "n/a (no AMX)".into() }
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        g.bench_function("f32", |bch| bch.iter(run(MatmulPrecision::F32)));
        if amx {
            g.bench_function("bf16_amx", |bch| bch.iter(run(MatmulPrecision::Bf16)));
        }
        g.finish();
    }
}

criterion_group!(benches, bench, bench_training);
criterion_main!(benches);
