//! Reflection padding and cropping of `(1, C, H, W)` image tensors, so that an image of any
//! size can be brought to the size grid the network needs (a multiple of 32 for the 4x model)
//! and the result cropped back afterwards.

use candle_core::{Device, Result, Tensor, bail};

/// Source index, in `0..n`, of padded position `i` (which may be negative or `>= n`) under
/// reflection without repeating the edge sample.
///
/// For `-n < i < 2n - 1` this is PyTorch's `'reflect'` (`i < 0 -> -i`, `i >= n -> 2(n-1) - i`).
/// Beyond that the reflection is repeated: the padded signal is the periodic extension, with
/// period `2(n-1)`, of `x[0], x[1], ..., x[n-1], x[n-2], ..., x[1]`, which is what reflecting the
/// already reflected signal again gives. A single sample (`n == 1`) has period 0 and is
/// repeated.
fn reflect_index(i: i64, n: usize) -> u32 {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as i64 - 1);
    let m = i.rem_euclid(period);
    let src = if m < n as i64 { m } else { period - m };
    src as u32
}

/// The gather table of one padded axis: `len + before + after` source indices.
fn reflect_table(len: usize, before: usize, after: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..(before + len + after) as i64).map(|p| reflect_index(p - before as i64, len)).collect();
    Tensor::from_vec(idx, before + len + after, device)
}

/// Size of dimension 2 and 3 of a `(1, C, H, W)` tensor, or an error naming the caller.
fn image_dims(t: &Tensor, what: &str) -> Result<(usize, usize)> {
    match *t.dims() {
        [1, _, h, w] => Ok((h, w)),
        _ => bail!("{what}: expected a (1, C, H, W) tensor, got shape {:?}", t.dims()),
    }
}

/// Pad a `(1, C, H, W)` tensor by reflection: `top` and `bottom` rows, `left` and `right`
/// columns.
///
/// Within one reflection (`top, bottom < H` and `left, right < W`) the result is exactly
/// `torch.nn.functional.pad(t, (left, right, top, bottom), mode='reflect')`: the edge row or
/// column is not repeated (`[a b c d]` padded by 2 on the left is `[c b a b c d]`). Larger pads,
/// which PyTorch refuses, continue the reflection periodically (`[a b c]` padded by 5 on the
/// left is `[b a b c b a b c]`, period `2(n-1)` = 4), so any pad works; a side of length 1 is
/// repeated. Any dtype and device; the values are copied, never interpolated.
///
/// Errors on a tensor that is not `(1, C, H, W)` or has `H == 0` or `W == 0`.
pub fn pad_reflect(t: &Tensor, top: usize, bottom: usize, left: usize, right: usize) -> Result<Tensor> {
    let (h, w) = image_dims(t, "pad_reflect")?;
    if h == 0 || w == 0 {
        bail!("pad_reflect: cannot pad an empty {h} x {w} image");
    }
    let mut out = t.clone();
    if top > 0 || bottom > 0 {
        let rows = reflect_table(h, top, bottom, t.device())?;
        out = out.index_select(&rows, 2)?;
    }
    if left > 0 || right > 0 {
        let cols = reflect_table(w, left, right, t.device())?;
        out = out.index_select(&cols, 3)?;
    }
    Ok(out)
}

/// Crop a `(1, C, H, W)` tensor to the `h x w` window whose top-left corner is row `top`,
/// column `left` (the inverse of [`pad_reflect`] with `crop(pad_reflect(t, a, _, b, _), a, b,
/// H, W) == t`).
///
/// Errors when the window does not lie inside the tensor or the tensor is not `(1, C, H, W)`.
pub fn crop(t: &Tensor, top: usize, left: usize, h: usize, w: usize) -> Result<Tensor> {
    let (th, tw) = image_dims(t, "crop")?;
    if top.checked_add(h).is_none_or(|b| b > th) || left.checked_add(w).is_none_or(|r| r > tw) {
        bail!("crop: window of {h} x {w} at (row {top}, column {left}) does not fit in a {th} x {tw} image");
    }
    t.narrow(2, top, h)?.narrow(3, left, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn grid(c: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        t.squeeze(0).unwrap().to_vec3::<f32>().unwrap()
    }

    #[test]
    fn reflect_index_matches_hand_values() {
        // n = 4: ... 2 1 | 0 1 2 3 | 2 1 0 1 2 3 2 ...
        let got: Vec<u32> = (-6..10).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3]);
        // n = 2 alternates, n = 1 repeats.
        let got: Vec<u32> = (-3..5).map(|i| reflect_index(i, 2)).collect();
        assert_eq!(got, vec![1, 0, 1, 0, 1, 0, 1, 0]);
        assert!((-5..5).all(|i| reflect_index(i, 1) == 0));
    }

    #[test]
    fn pad_reflect_hand_computed() {
        // 1 channel, 3 x 4:
        //  0  1  2  3
        //  4  5  6  7
        //  8  9 10 11
        let t = grid(1, 3, 4);
        let p = pad_reflect(&t, 1, 2, 2, 1).unwrap();
        assert_eq!(p.dims(), &[1, 1, 6, 7]);
        #[rustfmt::skip]
        let expect = vec![
            vec![6., 5., 4., 5., 6., 7., 6.],   // row -1 -> row 1
            vec![2., 1., 0., 1., 2., 3., 2.],
            vec![6., 5., 4., 5., 6., 7., 6.],
            vec![10., 9., 8., 9., 10., 11., 10.],
            vec![6., 5., 4., 5., 6., 7., 6.],   // row 3 -> row 1
            vec![2., 1., 0., 1., 2., 3., 2.],   // row 4 -> row 0
        ];
        assert_eq!(rows(&p), vec![expect]);

        // Pads beyond one reflection: a 1 x 3 row [0 1 2] padded by 5 left and 6 right.
        let t = grid(1, 1, 3);
        let p = pad_reflect(&t, 0, 0, 5, 6).unwrap();
        let r = &rows(&p)[0][0];
        assert_eq!(r, &vec![1., 0., 1., 2., 1., 0., 1., 2., 1., 0., 1., 2., 1., 0.]);
        // A single row is repeated vertically; channels are padded alike.
        let t = grid(2, 1, 2);
        let p = pad_reflect(&t, 2, 1, 0, 0).unwrap();
        assert_eq!(rows(&p), vec![vec![vec![0., 1.]; 4], vec![vec![2., 3.]; 4]]);
    }

    #[test]
    fn pad_then_crop_is_identity_and_any_dtype() {
        let t = grid(3, 5, 7).to_dtype(DType::BF16).unwrap();
        let p = pad_reflect(&t, 27, 0, 3, 25).unwrap();
        assert_eq!(p.dims(), &[1, 3, 32, 35]);
        assert_eq!(p.dtype(), DType::BF16);
        let c = crop(&p, 27, 3, 5, 7).unwrap();
        let a = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = c.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        // No pad is the identity.
        let z = pad_reflect(&t, 0, 0, 0, 0).unwrap();
        assert_eq!(z.dims(), t.dims());
    }

    #[test]
    fn bad_shapes_and_windows_are_errors() {
        let t = grid(1, 3, 4);
        assert!(crop(&t, 1, 1, 3, 1).is_err());
        assert!(crop(&t, 0, 4, 1, 1).is_err());
        assert!(crop(&t, usize::MAX, 0, 2, 1).is_err());
        assert!(crop(&t, 0, 0, 3, 4).is_ok());
        let flat = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(pad_reflect(&flat, 1, 1, 1, 1).is_err());
        assert!(crop(&flat, 0, 0, 1, 1).is_err());
        let empty = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(pad_reflect(&empty, 1, 1, 1, 1).is_err());
    }
}
