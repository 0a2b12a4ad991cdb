//! Each op's forward and backward against the candle-autograd composition it replaces (f32, same
//! inputs) and its backward against central finite differences of an f64 reference.

use candle_core::{Device, Tensor, Var};

use super::testutil::{central_diff, max_abs, max_abs_diff, to_vec, values, var};
use super::*;

/// `sum(f(x...) * w)` and its gradients for the fused op and the reference.
fn grads(vars: &[&Var], w: &Tensor, f: impl Fn(&[&Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let out = f(&ts);
    let loss = (&out * w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    (out, vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect())
}

/// Fused vs reference: outputs and every gradient within `tol` (relative to the largest value).
fn compare(
    vars: &[&Var],
    w: &Tensor,
    fast: impl Fn(&[&Tensor]) -> Tensor,
    slow: impl Fn(&[&Tensor]) -> Tensor,
    tol: f32,
) {
    let (of, gf) = grads(vars, w, fast);
    let (os, gs) = grads(vars, w, slow);
    let d = max_abs_diff(&of, &os);
    assert!(d <= tol * max_abs(&os).max(1.0), "forward differs by {d}");
    for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d <= tol * max_abs(b).max(1e-3), "gradient {i} differs by {d} (largest {})", max_abs(b));
    }
}

/// The fused op's gradient of input `which` against central differences of `f64_loss`.
fn check_fd(
    vars: &[&Var],
    which: usize,
    w: &Tensor,
    fast: impl Fn(&[&Tensor]) -> Tensor,
    f64_loss: impl Fn(&[Vec<f32>]) -> f64,
) {
    let (_, g) = grads(vars, w, fast);
    let g = to_vec(&g[which]);
    let inputs: Vec<Vec<f32>> = vars.iter().map(|v| to_vec(v.as_tensor())).collect();
    let n = inputs[which].len();
    let idx: Vec<usize> = (0..12).map(|i| (i * 7919 + 3) % n).collect();
    let fd = central_diff(&inputs[which], &idx, 1e-2, |x| {
        let mut all = inputs.clone();
        all[which] = x.to_vec();
        f64_loss(&all)
    });
    let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    for (&i, fd) in idx.iter().zip(fd) {
        let err = (g[i] as f64 - fd).abs();
        assert!(err <= 2e-3 * scale.max(1e-3), "input {which}[{i}]: backward {} vs finite difference {fd}", g[i]);
    }
}

fn weights(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values(seed, shape.iter().product()), shape, &Device::Cpu).unwrap()
}

fn f64v(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// f64 attention loss `sum(softmax(q k^T s) v * w)`.
#[allow(clippy::too_many_arguments)]
fn attention_f64(q: &[f64], k: &[f64], v: &[f64], w: &[f64], items: usize, tq: usize, tk: usize, d: usize) -> f64 {
    let s = 1.0 / (d as f64).sqrt();
    let mut loss = 0.0;
    for it in 0..items {
        for i in 0..tq {
            let qi = &q[(it * tq + i) * d..][..d];
            let sc: Vec<f64> = (0..tk)
                .map(|j| qi.iter().zip(&k[(it * tk + j) * d..][..d]).map(|(a, b)| a * b).sum::<f64>() * s)
                .collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                let o: f64 = (0..tk).map(|j| e[j] / z * v[(it * tk + j) * d + c]).sum();
                loss += o * w[(it * tq + i) * d + c];
            }
        }
    }
    loss
}

#[test]
fn attention_matches_autograd_and_finite_differences() {
    let (n, h, tq, tk, d) = (2, 2, 7, 13, 8);
    let q = var(1, &[n, h, tq, d]);
    let k = var(2, &[n, h, tk, d]);
    let v = var(3, &[n, h, tk, d]);
    let w = weights(4, &[n, h, tq, d]);
    let fast = |t: &[&Tensor]| attention(t[0], t[1], t[2]).unwrap();
    let slow = |t: &[&Tensor]| attention_reference(t[0], t[1], t[2]).unwrap();
    compare(&[&q, &k, &v], &w, fast, slow, 2e-5);
    let wv = f64v(&to_vec(&w));
    for which in 0..3 {
        check_fd(&[&q, &k, &v], which, &w, fast, |x| {
            attention_f64(&f64v(&x[0]), &f64v(&x[1]), &f64v(&x[2]), &wv, n * h, tq, tk, d)
        });
    }
    // The model's strided operands (a transposed view) give the same values.
    let qt = q.as_tensor().transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
    let d = max_abs_diff(
        &attention(&qt, k.as_tensor(), v.as_tensor()).unwrap(),
        &fast(&[q.as_tensor(), k.as_tensor(), v.as_tensor()]),
    );
    assert_eq!(d, 0.0);
}

/// f64 `sum((LN(x) g + b) * w)` over rows of `c`.
fn ln_f64(x: &[f64], g: &[f64], b: &[f64], w: &[f64], c: usize, eps: f64) -> f64 {
    let mut loss = 0.0;
    for (r, row) in x.chunks(c).enumerate() {
        let m = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            loss += ((row[i] - m) * rs * g[i] + b[i]) * w[r * c + i];
        }
    }
    loss
}

#[test]
fn ln_affine_matches_autograd_and_finite_differences() {
    // 200 rows: more than one chunk of the parallel column sums.
    let (rows, c, eps) = (200, 24, 1e-6);
    let x = var(5, &[4, rows / 4, c]);
    let g = var(6, &[1, 1, c]);
    let b = var(7, &[c]);
    let w = weights(8, &[4, rows / 4, c]);
    let fast = |t: &[&Tensor]| ln_affine(t[0], t[1], t[2], eps).unwrap();
    let slow = |t: &[&Tensor]| ln_affine_reference(t[0], t[1], t[2], eps).unwrap();
    compare(&[&x, &g, &b], &w, fast, slow, 2e-5);
    let wv = f64v(&to_vec(&w));
    for which in 0..3 {
        check_fd(&[&x, &g, &b], which, &w, fast, |t| ln_f64(&f64v(&t[0]), &f64v(&t[1]), &f64v(&t[2]), &wv, c, eps));
    }
}

#[test]
fn heads_rope_matches_autograd_and_finite_differences() {
    let (n, t, h, d) = (2, 6, 3, 8);
    let z = var(9, &[n, t, h, d]);
    let ang: Vec<f32> = values(10, n * t * d).iter().map(|a| a * 3.0).collect();
    let cos = Tensor::from_vec(ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), (n, 1, t, d), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), (n, 1, t, d), &Device::Cpu).unwrap();
    let w = weights(11, &[n, h, t, d]);
    let fast = |x: &[&Tensor]| heads_rope(x[0], &cos, &sin).unwrap();
    let slow = |x: &[&Tensor]| heads_rope_reference(x[0], &cos, &sin).unwrap();
    compare(&[&z], &w, fast, slow, 1e-6);
    let (cv, sv, wv) = (f64v(&to_vec(&cos)), f64v(&to_vec(&sin)), f64v(&to_vec(&w)));
    check_fd(&[&z], 0, &w, fast, |x| {
        let z = f64v(&x[0]);
        let mut loss = 0.0;
        for b in 0..n {
            for hh in 0..h {
                for ti in 0..t {
                    let src = &z[((b * t + ti) * h + hh) * d..][..d];
                    let tb = (b * t + ti) * d;
                    let wb = ((b * h + hh) * t + ti) * d;
                    for k in (0..d).step_by(2) {
                        let o0 = src[k] * cv[tb + k] - src[k + 1] * sv[tb + k];
                        let o1 = src[k + 1] * cv[tb + k + 1] + src[k] * sv[tb + k + 1];
                        loss += o0 * wv[wb + k] + o1 * wv[wb + k + 1];
                    }
                }
            }
        }
        loss
    });
    // Tables shared by the batch, (T, d).
    let (c1, s1) = (cos.get(0).unwrap().squeeze(0).unwrap(), sin.get(0).unwrap().squeeze(0).unwrap());
    let a = heads_rope(z.as_tensor(), &c1, &s1).unwrap();
    let b = heads_rope_reference(z.as_tensor(), &c1, &s1).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
}

#[test]
fn gelu_matches_autograd_and_finite_differences() {
    let x = Var::from_tensor(&(weights(12, &[3, 5000]) * 4.0).unwrap()).unwrap();
    let w = weights(13, &[3, 5000]);
    let fast = |t: &[&Tensor]| gelu(t[0]).unwrap();
    let slow = |t: &[&Tensor]| t[0].gelu().unwrap();
    compare(&[&x], &w, fast, slow, 2e-5);
    let wv = f64v(&to_vec(&w));
    check_fd(&[&x], 0, &w, fast, |t| {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        t[0].iter()
            .zip(&wv)
            .map(|(&v, w)| {
                let v = v as f64;
                0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()) * w
            })
            .sum()
    });
}

/// Results do not depend on the number of worker threads (exact resume needs the same bits).
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (n, h, tq, tk, d) = (3, 2, 70, 90, 16);
    let q = var(14, &[n, h, tq, d]);
    let k = var(15, &[n, h, tk, d]);
    let v = var(16, &[n, h, tk, d]);
    let g = var(17, &[d]);
    let w = weights(18, &[n, h, tq, d]);
    let run = || {
        let y = ln_affine(
            &attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap(),
            g.as_tensor(),
            g.as_tensor(),
            1e-6,
        )
        .unwrap();
        let loss = (gelu(&y).unwrap() * &w).unwrap().sum_all().unwrap();
        let gr = loss.backward().unwrap();
        [&q, &k, &v, &g].map(|x| to_vec(gr.get(x.as_tensor()).unwrap()))
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(run);
    assert!(one == three, "gradients differ between 1 and 3 threads");
}

#[test]
fn gather_matches_autograd() {
    // A 2 x 3 grid's neighbourhood table (edge replication), as WholeImageKv builds it.
    let grid = crate::model::blocks::BlockGrid::for_image(2, 3, 1).unwrap();
    let src: Vec<[usize; 4]> =
        grid.raster().iter().map(|p| crate::model::blocks::neighbours(*p).map(|q| q.row * grid.cols + q.col)).collect();
    let x = var(19, &[6, 2, 5, 4]);
    let w = weights(20, &[6, 2, 20, 4]);
    let fast = |t: &[&Tensor]| gather(t[0], &src).unwrap();
    let slow = |t: &[&Tensor]| gather_reference(t[0], &src).unwrap();
    // A copy and sums of at most four terms: equal up to the summation order.
    compare(&[&x], &w, fast, slow, 1e-6);
}

#[test]
fn softmax_exp_is_accurate() {
    // Relative error: the f32 rounding of x log2(e) dominates at large |x| (half an ulp of 125 is
    // 4e-6 of the result there), which does not matter next to a row maximum of 1.
    let (mut worst, mut worst_near) = (0f64, 0f64);
    for i in 0..=200_000 {
        let x = -90.0 * i as f32 / 200_000.0;
        let want = (x.max(-87.0) as f64).exp();
        let got = super::attention::exp_nonpos(x) as f64;
        let rel = (got - want).abs() / want;
        worst = worst.max(rel);
        if x >= -10.0 {
            worst_near = worst_near.max(rel);
        }
    }
    assert!(worst < 1e-5 && worst_near < 1e-6, "largest relative error {worst:e}, {worst_near:e} on [-10, 0]");
}

#[test]
fn linear_matches_autograd() {
    // 1100 rows: two full row blocks of 512 and a partial one; 300 outputs: a full and a partial
    // block of dW rows.
    let (xl, wl, bl, wtl) = (var(35, &[2, 550, 24]), var(36, &[300, 24]), var(37, &[300]), weights(38, &[2, 550, 300]));
    let fast = |t: &[&Tensor]| linear(t[0], t[1], Some(t[2])).unwrap();
    let slow = |t: &[&Tensor]| linear_reference(t[0], t[1], Some(t[2])).unwrap();
    compare(&[&xl, &wl, &bl], &wtl, fast, slow, 1e-5);
    let fast = |t: &[&Tensor]| linear(t[0], t[1], None).unwrap();
    let slow = |t: &[&Tensor]| linear_reference(t[0], t[1], None).unwrap();
    compare(&[&xl, &wl], &wtl, fast, slow, 1e-5);
    // A small case (one partial block each) against finite differences.
    let x = var(31, &[3, 100, 24]);
    let w = var(32, &[40, 24]);
    let b = var(33, &[40]);
    let wt = weights(34, &[3, 100, 40]);
    // Against finite differences of an f64 loss sum(w * (x W^T + b)).
    let wv = to_vec(&wt);
    let f64_loss = |inp: &[Vec<f32>]| -> f64 {
        let (xv, w_, bv) = (&inp[0], &inp[1], &inp[2]);
        let mut s = 0f64;
        for r in 0..300 {
            for o in 0..40 {
                let mut y = bv[o] as f64;
                for i in 0..24 {
                    y += xv[r * 24 + i] as f64 * w_[o * 24 + i] as f64;
                }
                s += y * wv[r * 40 + o] as f64;
            }
        }
        s
    };
    let fast = |t: &[&Tensor]| linear(t[0], t[1], Some(t[2])).unwrap();
    for which in 0..3 {
        check_fd(&[&x, &w, &b], which, &wt, fast, f64_loss);
    }
    // The same bits for any thread count.
    let run = || {
        let loss =
            (linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap() * &wt).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [&x, &w, &b].map(|v| to_vec(g.get(v.as_tensor()).unwrap()))
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(run);
    assert!(one == three, "the gradients differ between 1 and 3 threads");
    // Shapes are checked.
    assert!(
        linear(x.as_tensor(), &Tensor::zeros((40, 23), candle_core::DType::F32, &Device::Cpu).unwrap(), None).is_err()
    );
    assert!(
        linear(x.as_tensor(), w.as_tensor(), Some(&Tensor::zeros(39, candle_core::DType::F32, &Device::Cpu).unwrap()))
            .is_err()
    );
}

#[test]
fn group_offsets_match_autograd() {
    // 3 blocks, 2 heads, T = 5, d = 6.
    let k = var(41, &[3, 2, 20, 6]);
    let p = var(42, &[1, 2, 4, 1, 6]);
    let w = weights(43, &[3, 2, 20, 6]);
    let fast = |t: &[&Tensor]| add_group_pos(t[0], t[1]).unwrap();
    let slow = |t: &[&Tensor]| add_group_pos_reference(t[0], t[1]).unwrap();
    compare(&[&k, &p], &w, fast, slow, 1e-6);
    let wv = to_vec(&w);
    // sum(w * (k + p)): dp[h, g, c] is the sum of w over blocks and tokens of group g.
    let f64_loss = |inp: &[Vec<f32>]| -> f64 {
        let (kv, pv) = (&inp[0], &inp[1]);
        let mut s = 0f64;
        for (j, (&kk, &ww)) in kv.iter().zip(&wv).enumerate() {
            let (c, tok, hh) = (j % 6, (j / 6) % 20, (j / 120) % 2);
            s += (kk as f64 + pv[(hh * 4 + tok / 5) * 6 + c] as f64) * ww as f64;
        }
        s
    };
    check_fd(&[&k, &p], 1, &w, fast, f64_loss);
    assert!(
        add_group_pos(k.as_tensor(), &Tensor::zeros((1, 2, 4, 1, 5), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err()
    );
    assert!(
        add_group_pos(&Tensor::zeros((3, 2, 18, 6), candle_core::DType::F32, &Device::Cpu).unwrap(), p.as_tensor())
            .is_err()
    );
}

/// The row loops compiled per instruction set (softmax, score gradient, GELU, LayerNorm) give the same bits
/// on every path this CPU runs (no FMA contraction, the same summation order).
#[test]
fn row_kernels_give_the_same_bits_on_every_path() {
    let q = var(51, &[1, 2, 9, 8]);
    let k = var(52, &[1, 2, 20, 8]);
    let v = var(53, &[1, 2, 20, 8]);
    let x = Var::from_tensor(&(weights(54, &[3, 700]) * 4.0).unwrap()).unwrap();
    let (wa, wg) = (weights(55, &[1, 2, 9, 8]), weights(56, &[3, 700]));
    // LayerNorm rows of 70: four 16-lane chunks and a remainder.
    let (ln_x, ln_g, ln_b, wl) = (var(57, &[30, 70]), var(58, &[70]), var(59, &[70]), weights(60, &[30, 70]));
    let run = || {
        let a = attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        let y = gelu(x.as_tensor()).unwrap();
        let l = ln_affine(ln_x.as_tensor(), ln_g.as_tensor(), ln_b.as_tensor(), 1e-5).unwrap();
        let parts = [(&a * &wa).unwrap(), (&y * &wg).unwrap(), (&l * &wl).unwrap()];
        let loss = parts.iter().map(|p| p.sum_all().unwrap()).reduce(|s, p| (s + p).unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let mut out = vec![to_vec(&a), to_vec(&y), to_vec(&l)];
        out.extend([&q, &k, &v, &x, &ln_x, &ln_g, &ln_b].map(|t| to_vec(g.get(t.as_tensor()).unwrap())));
        out
    };
    let paths = crate::kernels::supported_paths();
    let first = crate::kernels::with_path(paths[0], run).unwrap();
    for &p in &paths[1..] {
        assert!(
            crate::kernels::with_path(p, run).unwrap() == first,
            "path {} differs from {}",
            p.name(),
            paths[0].name()
        );
    }
}

#[test]
fn gelu_linear_matches_autograd() {
    // 300 rows of 40 activations (a partial GELU chunk), 24 outputs.
    let u = Var::from_tensor(&(weights(61, &[3, 100, 40]) * 3.0).unwrap()).unwrap();
    let w = var(62, &[24, 40]);
    let b = var(63, &[24]);
    let wt = weights(64, &[3, 100, 24]);
    let fast = |t: &[&Tensor]| gelu_linear(t[0], t[1], t[2]).unwrap();
    let slow = |t: &[&Tensor]| linear_reference(&t[0].gelu().unwrap(), t[1], Some(t[2])).unwrap();
    compare(&[&u, &w, &b], &wt, fast, slow, 2e-5);
    // The same as the two fused ops one after the other.
    let two = |t: &[&Tensor]| linear(&gelu(t[0]).unwrap(), t[1], Some(t[2])).unwrap();
    compare(&[&u, &w, &b], &wt, fast, two, 1e-6);
    assert!(
        gelu_linear(
            u.as_tensor(),
            &Tensor::zeros((24, 39), candle_core::DType::F32, &Device::Cpu).unwrap(),
            b.as_tensor()
        )
        .is_err()
    );
}

/// With bf16 products (AMX tiles where the CPU has them, f32 elsewhere) the dense layers and the
/// attention stay within bf16 rounding of the f32 autograd composition, and do not depend on the
/// thread count.
#[test]
fn bf16_products_match_autograd_within_bf16_rounding() {
    let amx = with_matmul(MatmulPrecision::Bf16, products) == MatmulPrecision::Bf16;
    println!("bf16 products {}", if amx { "on AMX tiles" } else { "unavailable here: f32 products checked" });
    // bf16 keeps 8 significant bits: each product is off by up to ~2^-8 relative, sums of
    // independent signs much less; 1e-2 of the largest value bounds every case here.
    let tol = if amx { 1e-2 } else { 2e-5 };
    let (xl, wl, bl, wtl) = (var(35, &[2, 550, 24]), var(36, &[300, 24]), var(37, &[300]), weights(38, &[2, 550, 300]));
    with_matmul(MatmulPrecision::Bf16, || {
        let fast = |t: &[&Tensor]| linear(t[0], t[1], Some(t[2])).unwrap();
        let slow = |t: &[&Tensor]| linear_reference(t[0], t[1], Some(t[2])).unwrap();
        compare(&[&xl, &wl, &bl], &wtl, fast, slow, tol);
        let u = Var::from_tensor(&(weights(61, &[3, 100, 40]) * 3.0).unwrap()).unwrap();
        let (w, b, wt) = (var(62, &[24, 40]), var(63, &[24]), weights(64, &[3, 100, 24]));
        let fast = |t: &[&Tensor]| gelu_linear(t[0], t[1], t[2]).unwrap();
        let slow = |t: &[&Tensor]| linear_reference(&t[0].gelu().unwrap(), t[1], Some(t[2])).unwrap();
        compare(&[&u, &w, &b], &wt, fast, slow, tol);
        let (n, h, tq, tk, d) = (2, 2, 70, 130, 64);
        let (q, k, v, w) =
            (var(1, &[n, h, tq, d]), var(2, &[n, h, tk, d]), var(3, &[n, h, tk, d]), weights(4, &[n, h, tq, d]));
        let fast = |t: &[&Tensor]| attention(t[0], t[1], t[2]).unwrap();
        let slow = |t: &[&Tensor]| attention_reference(t[0], t[1], t[2]).unwrap();
        compare(&[&q, &k, &v], &w, fast, slow, tol);
    });
    // The same bits for any thread count.
    let run = || {
        with_matmul(MatmulPrecision::Bf16, || {
            let y = linear(xl.as_tensor(), wl.as_tensor(), Some(bl.as_tensor())).unwrap();
            let g = (y * &wtl).unwrap().sum_all().unwrap().backward().unwrap();
            [&xl, &wl, &bl].map(|v| to_vec(g.get(v.as_tensor()).unwrap()))
        })
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(run);
    assert!(one == three, "the gradients differ between 1 and 3 threads");
}
