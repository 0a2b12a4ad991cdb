//! The compute device: the CPU, or an NVIDIA GPU through candle's CUDA backend (cargo feature
//! `cuda`, built by `bench/build-cuda.sh`).
//!
//! A CUDA build opens the CUDA libraries (the driver's `libcuda.so.1`, cuBLAS, cuBLASLt, cuRAND)
//! when a GPU is first asked for, not when the program starts: on a machine without them, or without a
//! GPU, [`open`] says so in [`OpenedDevice::fallback`] and gives the CPU.
//!
//! What runs where with a GPU: the weights, the network's activations, the LR features and (unless
//! offloaded, see [`crate::schedule::CachedKv`]) the block scheduler's K/V cache live on the GPU;
//! images, resizes, the noise and the sampler state stay in host memory and move to the GPU one
//! block batch at a time.

use candle_core::{DType, Device, Tensor};

use crate::error::{InfditError, Result};

/// A device as asked for on the command line: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The CPU.
    #[default]
    Cpu,
    /// NVIDIA GPU number N (CUDA ordinal).
    Cuda(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:")) {
                Some(n) => n
                    .parse::<usize>()
                    .map(Self::Cuda)
                    .map_err(|_| format!("'{s}': the GPU number after 'cuda:' must be 0, 1, 2, ...")),
                None => Err(format!("'{s}' is not a device (use cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceRequest {
    /// The network's dtype when none is asked for: bf16 on a GPU, f32 on the CPU (exact parity with
    /// the official fp32 code; bf16 is an opt-in there, faster only where the CPU has the bf16 dot
    /// product, see [`crate::kernels::bf16_gemm`]).
    pub fn default_dtype(self) -> DType {
        match self {
            Self::Cpu => DType::F32,
            Self::Cuda(_) => DType::BF16,
        }
    }
}

/// Whether this build has the CUDA backend (cargo feature `cuda`).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// How to get a build with the CUDA backend, for messages.
pub const CUDA_BUILD_HINT: &str = "build it with bench/build-cuda.sh (cargo build --release --features cuda with the \
     CUDA compiler from PyPI; see docs/gpu.md)";

/// The device a request got.
#[derive(Debug, Clone)]
pub struct OpenedDevice {
    /// Where the network runs.
    pub device: Device,
    /// The request.
    pub requested: DeviceRequest,
    /// Set when a GPU was asked for and the run goes on on the CPU instead: why (no GPU, no
    /// NVIDIA driver, CUDA libraries missing). Callers print it as a warning.
    pub fallback: Option<String>,
}

impl OpenedDevice {
    /// Whether the network runs on a GPU.
    pub fn is_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    /// The device used: `cpu` (also after a fallback) or `cuda:N`.
    pub fn name(&self) -> String {
        if self.is_gpu() { self.requested.to_string() } else { "cpu".into() }
    }

    /// A short name of the device for messages: `cpu`, or `cuda:N (NAME)`.
    pub fn describe(&self) -> String {
        match &self.device {
            Device::Cpu => "cpu".into(),
            d => gpu_name(d).map_or_else(|| format!("{:?}", d.location()), |n| format!("{} ({n})", self.requested)),
        }
    }
}

/// Opens the device of a request. A CPU-only build refuses a GPU request with an error that says
/// how to build with CUDA; a CUDA build that finds no usable GPU falls back to the CPU and says
/// why in [`OpenedDevice::fallback`]. A GPU number beyond the GPUs present is an error.
pub fn open(req: DeviceRequest) -> Result<OpenedDevice> {
    match req {
        DeviceRequest::Cpu => Ok(OpenedDevice { device: Device::Cpu, requested: req, fallback: None }),
        DeviceRequest::Cuda(n) => open_cuda(n, req),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_n: usize, req: DeviceRequest) -> Result<OpenedDevice> {
    Err(InfditError::Config(format!(
        "device {req}: this infdit binary was built without CUDA support (CPU only); {CUDA_BUILD_HINT}"
    )))
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize, req: DeviceRequest) -> Result<OpenedDevice> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let cpu = |why: String| {
        Ok(OpenedDevice {
            device: Device::Cpu,
            requested: req,
            fallback: Some(format!("no usable NVIDIA GPU for device {req}: {why}; running on the CPU instead")),
        })
    };
    // The driver first: without it there is no GPU to talk to.
    if let Err(tried) = cuda_libs::probe(cuda_libs::DRIVER) {
        return cpu(format!("the NVIDIA driver library could not be loaded (tried {tried})"));
    }
    let count = match quiet_unwind(CudaContext::device_count) {
        Ok(Ok(c)) => c.max(0) as usize,
        Ok(Err(e)) => return cpu(format!("the NVIDIA driver found no GPU ({e})")),
        Err(p) => return cpu(format!("the NVIDIA driver failed ({p})")),
    };
    if count == 0 {
        return cpu("the NVIDIA driver reports no GPU".into());
    }
    if n >= count {
        return Err(InfditError::Config(format!(
            "device {req}: there {} only {count} GPU{} (cuda:0{})",
            if count == 1 { "is" } else { "are" },
            if count == 1 { "" } else { "s" },
            if count > 1 { format!(" to cuda:{}", count - 1) } else { String::new() }
        )));
    }
    let mut missing = Vec::new();
    for lib in cuda_libs::MATH {
        if let Err(tried) = cuda_libs::probe(lib) {
            missing.push(tried);
        }
    }
    if !missing.is_empty() {
        return cpu(format!(
            "a GPU is there but these CUDA 13 libraries could not be loaded: {}; put their folder on \
             LD_LIBRARY_PATH (PyTorch's nvidia/cu13/lib has them)",
            missing.join(", ")
        ));
    }
    match quiet_unwind(|| Device::new_cuda(n)) {
        Ok(Ok(device)) => Ok(OpenedDevice { device, requested: req, fallback: None }),
        Ok(Err(e)) => cpu(format!("opening GPU {n} failed: {e}")),
        Err(p) => cpu(format!("opening GPU {n} failed: {p}")),
    }
}

/// Runs `f`, turning a panic (cudarc panics when a library it loads lacks a symbol) into an error
/// without printing the panic message.
#[cfg(feature = "cuda")]
fn quiet_unwind<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// Whether the CUDA libraries can be opened, checked with dlopen before cudarc opens them (it
/// panics when one is missing).
#[cfg(feature = "cuda")]
mod cuda_libs {
    /// One library and the file names to try.
    pub struct Lib {
        pub name: &'static str,
        pub files: &'static [&'static str],
    }

    pub const DRIVER: &Lib = &Lib { name: "libcuda", files: &["libcuda.so.1", "libcuda.so"] };
    pub const MATH: &[&Lib] = &[
        &Lib { name: "cuBLAS", files: &["libcublas.so.13", "libcublas.so"] },
        &Lib { name: "cuBLASLt", files: &["libcublasLt.so.13", "libcublasLt.so"] },
        &Lib { name: "cuRAND", files: &["libcurand.so.10", "libcurand.so"] },
    ];

    /// Ok when one of the files opens; otherwise the names tried.
    pub fn probe(lib: &Lib) -> Result<(), String> {
        for f in lib.files {
            // SAFETY: loading a CUDA library runs its initialisers, which is what using it does too.
            if unsafe { libloading::Library::new(*f) }.is_ok() {
                return Ok(());
            }
        }
        Err(format!("{} ({})", lib.name, lib.files.join(" or ")))
    }
}

/// The GPU's name, e.g. "NVIDIA H100 80GB HBM3" (None on the CPU).
pub fn gpu_name(dev: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return c.cuda_stream().context().name().ok();
    }
    let _ = dev;
    None
}

/// Free and total GPU memory in bytes, `(free, total)` (None on the CPU).
pub fn gpu_memory(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return c.cuda_stream().context().mem_get_info().ok().map(|(f, t)| (f as u64, t as u64));
    }
    let _ = dev;
    None
}

/// The default memory budget of a GPU run: 90% of the GPU memory free now, less 512 MiB for the
/// CUDA context, cuBLAS workspaces and fragmentation (at least 256 MiB).
pub fn default_gpu_budget(free: u64) -> u64 {
    (free / 10 * 9).saturating_sub(512 << 20).max(256 << 20)
}

/// Peak GPU memory held by tensors, in bytes, since the last [`reset_gpu_peak`]: the high-water
/// mark of the device's current CUDA memory pool (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`), which is where
/// candle allocates (stream-ordered `cuMemAllocAsync`) on GPUs that support memory pools. It counts
/// what tensors hold, like `torch.cuda.max_memory_allocated`, not the CUDA context or cuBLAS's
/// workspaces. None on the CPU or when the pool cannot be read.
pub fn gpu_peak(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return pool::attribute(c, pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
    }
    let _ = dev;
    None
}

/// Peak GPU memory reserved by the memory pool (what `nvidia-smi` sees of it), like
/// `torch.cuda.max_memory_reserved`; see [`gpu_peak`].
pub fn gpu_peak_reserved(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        return pool::attribute(c, pool::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH);
    }
    let _ = dev;
    None
}

/// Starts the peaks of [`gpu_peak`] and [`gpu_peak_reserved`] afresh from the memory in use now
/// (after waiting for the GPU's queued work). Does nothing on the CPU.
pub fn reset_gpu_peak(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = dev {
        pool::reset(c, pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
        pool::reset(c, pool::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    pub use sys::CUmemPool_attribute as Attr;

    fn current(c: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = c.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()
    }

    pub fn attribute(c: &CudaDevice, attr: Attr) -> Option<u64> {
        let pool = current(c)?;
        let mut v: u64 = 0;
        // SAFETY: the *_MEM_HIGH attributes are cuuint64_t.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }.ok()?;
        Some(v)
    }

    pub fn reset(c: &CudaDevice, attr: Attr) {
        if let Some(pool) = current(c) {
            let mut zero: u64 = 0;
            // SAFETY: as above; setting a high-water mark to 0 resets it to the current value.
            let _ = unsafe { result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast()) };
        }
    }
}

/// `t` on `dev`, copying only `t`'s own elements: candle's `to_device` copies the whole storage
/// behind a view (a block of a batch, a band of an image), so a view is made compact first.
pub fn to_device_compact(t: &Tensor, dev: &Device) -> candle_core::Result<Tensor> {
    if t.device().same_device(dev) {
        return Ok(t.clone());
    }
    t.force_contiguous()?.to_device(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert_eq!("CPU".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:0".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(3)));
        assert_eq!("gpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda(0)));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "metal", "cuda0", "cuda:1:2"] {
            assert!(bad.parse::<DeviceRequest>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
        assert_eq!(DeviceRequest::Cpu.to_string(), "cpu");
    }

    #[test]
    fn default_dtypes() {
        assert_eq!(DeviceRequest::Cpu.default_dtype(), DType::F32);
        assert_eq!(DeviceRequest::Cuda(1).default_dtype(), DType::BF16);
    }

    #[test]
    fn cpu_opens() {
        let d = open(DeviceRequest::Cpu).unwrap();
        assert!(d.device.is_cpu() && d.fallback.is_none() && !d.is_gpu());
        assert_eq!(d.describe(), "cpu");
        assert_eq!(gpu_memory(&d.device), None);
        assert_eq!(gpu_peak(&d.device), None);
        reset_gpu_peak(&d.device).unwrap();
    }

    /// Without the `cuda` feature a GPU request is an error naming the build; with it, on a
    /// machine without a GPU (this project's CI), the CPU with a reason.
    #[test]
    fn gpu_request_without_a_gpu() {
        let cuda_built = CUDA_BUILT;
        match open(DeviceRequest::Cuda(0)) {
            Err(e) => {
                assert!(!cuda_built);
                let m = e.to_string();
                assert!(m.contains("built without CUDA") && m.contains("bench/build-cuda.sh"), "{m}");
            }
            Ok(d) => {
                assert!(cuda_built);
                if d.device.is_cpu() {
                    assert!(d.fallback.as_deref().is_some_and(|m| m.contains("running on the CPU")));
                }
            }
        }
    }

    #[test]
    fn default_budget() {
        assert_eq!(default_gpu_budget(0), 256 << 20);
        assert_eq!(default_gpu_budget(80 << 30), (72 << 30) - (512 << 20));
    }

    #[test]
    fn compact_copy_keeps_values() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((4, 6)).unwrap();
        let band = t.narrow(0, 1, 2).unwrap();
        let c = to_device_compact(&band, &Device::Cpu).unwrap();
        assert_eq!(c.to_vec2::<f32>().unwrap(), band.to_vec2::<f32>().unwrap());
    }
}
