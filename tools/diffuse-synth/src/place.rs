//! Where the models run: `--device auto|cpu|cuda[:N]` and `--dtype f32|bf16|f16`.
//!
//! The CPU path is the f32 one the rest of the crate is written for (the `cpu_kernels`
//! take every untracked f32 CPU tensor). On CUDA the same modules run on candle's CUDA
//! backend: every `cpu_kernels` entry point falls back to candle's own ops for a tensor
//! that is not f32 on the CPU, and candle's autograd gives the guidance gradients. The
//! UNet and VAE hold their weights in the chosen dtype (cuBLAS GEMMs with f32
//! accumulation, candle's default); the text encoder and the classifiers stay f32 (run
//! once per prompt, or small), and everything crossing to the host (latents, noise
//! predictions, gradients, images) is f32, so the schedulers run unchanged.
//!
//! The CUDA backend exists only in a build with the cargo feature `cuda` (see
//! `tools/diffuse-synth/cuda-build.sh`); without it `auto` stays on the CPU and `cuda`
//! is refused with what to do.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ftk::device::DeviceArg;
use ftk::{bail, Error, Result};
use std::path::Path;

/// A device and the dtype of the UNet's and VAE's weights and activations.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device: Device,
    pub dtype: DType,
}

impl Placement {
    /// The CPU path (f32, the fast kernels).
    pub fn cpu() -> Placement {
        Placement {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Resolve `--device` and `--dtype`: `auto` falls back to the CPU silently (also
    /// in a build without CUDA support); `cuda[:N]` without a usable device is a usage
    /// error (exit 2), a device that fails to start a device error (exit 3).
    pub fn select(device: DeviceArg, dtype: &str) -> Result<Placement> {
        let dtype = parse_dtype(dtype)?;
        let resolved = match (device, cfg!(feature = "cuda")) {
            (DeviceArg::Cuda(n), false) => {
                // The driver check first: its message is the more useful one when both apply.
                DeviceArg::Cuda(n).resolve()?;
                bail!(
                    "--device cuda:{n}: this diffuse-synth was built without CUDA support; \
                     use --device cpu or auto, or build it with `cargo build --release -p \
                     diffuse-synth --features cuda` (tools/diffuse-synth/cuda-build.sh)"
                )
            }
            (DeviceArg::Auto, false) => ftk::device::Device::Cpu,
            (d, _) => d.resolve()?,
        };
        let device = match (resolved, device) {
            (ftk::device::Device::Cpu, _) => Device::Cpu,
            // a GPU whose libraries do not load: `auto` says so once and stays on the CPU
            (ftk::device::Device::Cuda(n), DeviceArg::Auto) => open_cuda(n).unwrap_or_else(|e| {
                eprintln!("diffuse-synth: warning: --device auto: {e}; running on the CPU");
                Device::Cpu
            }),
            (ftk::device::Device::Cuda(n), _) => open_cuda(n)?,
        };
        if device.is_cpu() && dtype != DType::F32 {
            bail!(
                "--dtype {}: half precision runs on CUDA only (--device cuda); the CPU path is f32",
                dtype.as_str()
            );
        }
        Ok(Placement { device, dtype })
    }

    /// This placement with f32 weights (text encoder, classifiers).
    pub fn f32(&self) -> Placement {
        Placement {
            device: self.device.clone(),
            dtype: DType::F32,
        }
    }

    /// f32 on `dev`.
    pub fn on(self, dev: &Device) -> Placement {
        Placement {
            device: dev.clone(),
            dtype: self.dtype,
        }
    }

    /// `t` on this device in this dtype (a no-op on the CPU path; differentiable).
    pub fn input(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_device(&self.device)?.to_dtype(self.dtype)
    }

    /// `what` for messages: `cpu`, `cuda:0 bf16`.
    pub fn describe(&self) -> String {
        match &self.device {
            Device::Cpu => "cpu".into(),
            d => format!("{d:?} {}", self.dtype.as_str()),
        }
    }
}

/// `--dtype`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        o => bail!("--dtype {o:?}: use f32, bf16 or f16"),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    use candle_core::cuda::cudarc;
    // candle's backend loads cuBLAS, cuBLASLt and cuRAND while it starts, and cudarc
    // panics on a library it cannot load: check each first. The driver was checked by
    // `resolve`.
    // SAFETY: each call only tries to dlopen the library.
    let libs = unsafe {
        [
            (
                "cuBLAS (libcublas.so)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "cuBLASLt (libcublasLt.so)",
                cudarc::cublaslt::sys::is_culib_present(),
            ),
            (
                "cuRAND (libcurand.so)",
                cudarc::curand::sys::is_culib_present(),
            ),
        ]
    };
    for (name, present) in libs {
        if !present {
            return Err(Error::device(format!(
                "--device cuda:{n}: {name} cannot be loaded; install the CUDA 12 runtime \
                 libraries (or the nvidia-cublas-cu12 / nvidia-curand-cu12 wheels) and add \
                 their lib directories to LD_LIBRARY_PATH, or use --device cpu"
            )));
        }
    }
    Device::new_cuda(n).map_err(|e| {
        let line = e.to_string().lines().next().unwrap_or("").to_string();
        Error::device(format!(
            "--device cuda:{n}: starting candle's CUDA backend: {line}"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(Error::internal(format!(
        "cuda:{n} resolved in a build without CUDA support"
    )))
}

/// The tensors of a safetensors file as a VarBuilder on `place`, each read when a
/// module asks for it (see [`crate::weights`]) and converted to the dtype on the device.
pub fn var_builder(file: &Path, place: &Placement) -> Result<VarBuilder<'static>> {
    crate::weights::var_builder(file, place.dtype, &place.device)
}

impl crate::model::Unet {
    /// The UNet's noise prediction, f32 on the UNet's device, for inputs on any device in
    /// f32 (moved and cast here; differentiable, so the guidance gradient reaches an f32
    /// latent on the device).
    pub fn eps(
        &self,
        x: &Tensor,
        t: f64,
        ctx: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let p = &self.place;
        let labels = class_labels.map(|l| p.input(l)).transpose()?;
        self.model
            .forward_with_class(&p.input(x)?, t, &p.input(ctx)?, labels.as_ref())?
            .to_dtype(DType::F32)
    }
}

impl crate::model::Vae {
    /// The decoder's output for scaled latents `x` (f32, any device), f32 on the VAE's device.
    pub fn decode_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.model
            .decode(&self.place.input(x)?)?
            .to_dtype(DType::F32)
    }
}

/// torch's MaxPool2d(3, stride 2, padding 1) for any device: the CPU kernel for f32 CPU
/// tensors, else [`max_pool_3x3_s2_ops`].
pub fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return crate::cpu_kernels::resnet::max_pool_3x3_s2(x);
    }
    max_pool_3x3_s2_ops(x)
}

/// The same pool as the maximum of nine strided views of the input under a -inf
/// border, in differentiable candle ops (candle's own max-pool has no padding and no
/// gradient for a stride other than the kernel size). Ties split the gradient, which
/// only happens at ReLU zeros here, where it is masked anyway.
pub fn max_pool_3x3_s2_ops(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // one -inf row/column before, two after: the views below read up to 2*out + 2
    let lo = |shape: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    let x = Tensor::cat(&[&lo((n, c, h, 1))?, x, &lo((n, c, h, 2))?], 3)?;
    let x = Tensor::cat(&[&lo((n, c, 1, w + 3))?, &x, &lo((n, c, 2, w + 3))?], 2)?;
    // elements off, off + 2, ... (count of them) along `dim`
    let every2 = |t: &Tensor, dim: usize, off: usize, count: usize| {
        let y = t.narrow(dim, off, 2 * count)?;
        let mut d = y.dims().to_vec();
        d[dim] = count;
        d.insert(dim + 1, 2);
        y.reshape(d)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
    };
    let mut out: Option<Tensor> = None;
    for di in 0..3 {
        let rows = every2(&x, 2, di, ho)?;
        for dj in 0..3 {
            let v = every2(&rows, 3, dj, wo)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("empty pool window".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_and_device_parse() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("f16").unwrap(), DType::F16);
        assert!(parse_dtype("fp8").is_err());
        let p = Placement::select(DeviceArg::Cpu, "f32").unwrap();
        assert!(p.device.is_cpu());
        // half precision is refused on the CPU with exit 2, whatever the machine has
        let e = Placement::select(DeviceArg::Cpu, "bf16").unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
    }

    #[test]
    fn auto_without_a_gpu_is_the_cpu() {
        if ftk::device::cuda_devices().is_err() || !cfg!(feature = "cuda") {
            let p = Placement::select(DeviceArg::Auto, "f32").unwrap();
            assert!(p.device.is_cpu());
        }
    }

    /// The candle-ops max-pool (the GPU path) equals the CPU kernel, values and input
    /// gradients, for odd and even sizes (distinct inputs: no ties).
    #[test]
    fn max_pool_ops_match_kernel() {
        for (h, w) in [(7, 6), (8, 9), (1, 2)] {
            let (n, c) = (2, 3);
            let len = n * c * h * w;
            let v: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 257) as f32 - 128.0) / 7.0)
                .collect();
            let x = Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
            let up = Tensor::from_vec(
                (0..len).map(|i| (i % 5) as f32 - 1.5).collect::<Vec<_>>(),
                (n, c, h, w),
                &Device::Cpu,
            )
            .unwrap();
            let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
                let var = candle_core::Var::from_tensor(&x).unwrap();
                let y = f(var.as_tensor()).unwrap();
                // a weighted sum, so the gradient check sees where each output's comes from
                let wts = up.narrow(2, 0, y.dim(2).unwrap()).unwrap();
                let wts = wts.narrow(3, 0, y.dim(3).unwrap()).unwrap();
                let g = (&y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = g.get(var.as_tensor()).unwrap().flatten_all().unwrap();
                (
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    gx.to_vec1::<f32>().unwrap(),
                )
            };
            let want = run(&|t| crate::cpu_kernels::resnet::max_pool_3x3_s2(t));
            let got = run(&|t| max_pool_3x3_s2_ops(t));
            assert_eq!(got, want, "{h}x{w}");
        }
    }
}
