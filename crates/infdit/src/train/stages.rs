//! The Real-ESRGAN degradation recipe: the parameters of its two stages and of the final step
//! (what [`super::degrade::degrade`] and the kernels of [`super::kernels`] draw from).

/// The parameters of one degradation stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageConfig {
    /// Weights of the six kernel kinds (`KernelKind::ALL` order: iso, aniso, generalised iso,
    /// generalised aniso, plateau iso, plateau aniso).
    pub kernel_probs: [f64; 6],
    /// Probability that the blur kernel is a sinc instead.
    pub sinc_prob: f64,
    /// Range of the Gaussian sigmas (pixels).
    pub blur_sigma: (f64, f64),
    /// Range of the generalised-Gaussian shape β.
    pub betag_range: (f64, f64),
    /// Range of the plateau shape β.
    pub betap_range: (f64, f64),
    /// Probabilities of resizing up, down, or keeping the size.
    pub resize_prob: [f64; 3],
    /// Scale range (up draws from `[1, hi)`, down from `[lo, 1)`).
    pub resize_range: (f64, f64),
    /// Probability of Gaussian noise (else Poisson noise).
    pub gaussian_noise_prob: f64,
    /// Gaussian noise sigma range, in 8-bit levels (divided by 255).
    pub noise_range: (f64, f64),
    /// Poisson noise scale range.
    pub poisson_scale_range: (f64, f64),
    /// Probability that the noise is gray (same for all channels).
    pub gray_noise_prob: f64,
    /// JPEG quality range.
    pub jpeg_range: (f64, f64),
}

/// Real-ESRGAN degradation parameters; [`Default`] is the `train_realesrgan_x4plus.yml` config.
#[derive(Debug, Clone, PartialEq)]
pub struct DegradationConfig {
    /// Blur kernel sizes: odd values in this inclusive range (7..=21).
    pub kernel_range: (usize, usize),
    /// First stage: kernel probs [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], sinc 0.1, sigma [0.2, 3],
    /// betag [0.5, 4], betap [1, 2], resize [0.2, 0.7, 0.1] over [0.15, 1.5], Gaussian noise 0.5
    /// with sigma [1, 30], Poisson scale [0.05, 3], gray 0.4, JPEG [30, 95].
    pub first: StageConfig,
    /// Second stage: same kernel probs, sinc 0.1, sigma [0.2, 1.5], betag [0.5, 4], betap [1, 2],
    /// resize [0.3, 0.4, 0.3] over [0.3, 1.2], Gaussian noise 0.5 with sigma [1, 25], Poisson
    /// scale [0.05, 2.5], gray 0.4, JPEG [30, 95].
    pub second: StageConfig,
    /// Probability that the second blur is applied (0.8).
    pub second_blur_prob: f64,
    /// Probability of the final sinc filter (0.8; otherwise the identity "pulse").
    pub final_sinc_prob: f64,
}

impl Default for DegradationConfig {
    fn default() -> Self {
        let kernel_probs = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03];
        Self {
            kernel_range: (7, 21),
            first: StageConfig {
                kernel_probs,
                sinc_prob: 0.1,
                blur_sigma: (0.2, 3.0),
                betag_range: (0.5, 4.0),
                betap_range: (1.0, 2.0),
                resize_prob: [0.2, 0.7, 0.1],
                resize_range: (0.15, 1.5),
                gaussian_noise_prob: 0.5,
                noise_range: (1.0, 30.0),
                poisson_scale_range: (0.05, 3.0),
                gray_noise_prob: 0.4,
                jpeg_range: (30.0, 95.0),
            },
            second: StageConfig {
                kernel_probs,
                sinc_prob: 0.1,
                blur_sigma: (0.2, 1.5),
                betag_range: (0.5, 4.0),
                betap_range: (1.0, 2.0),
                resize_prob: [0.3, 0.4, 0.3],
                resize_range: (0.3, 1.2),
                gaussian_noise_prob: 0.5,
                noise_range: (1.0, 25.0),
                poisson_scale_range: (0.05, 2.5),
                gray_noise_prob: 0.4,
                jpeg_range: (30.0, 95.0),
            },
            second_blur_prob: 0.8,
            final_sinc_prob: 0.8,
        }
    }
}
