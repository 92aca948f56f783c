//! The GPU side's entry checks: is there a driver and a device, is there
//! NVRTC, and compiling the actor-host translation unit to PTX. cudarc
//! (dynamic loading) panics when it cannot load a library, so every path
//! probes first and returns a typed error.

use crate::CudaError;
use cudarc::driver::sys::CUdevice_attribute;

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// The driver's CUDA version (`cuDriverGetVersion`, e.g. 13000).
    pub driver_version: i32,
    /// How many devices.
    pub devices: usize,
    /// Device 0's name.
    pub name: String,
    /// Device 0's compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Whether host and device atomics on mapped memory are atomic with
    /// each other (`HOST_NATIVE_ATOMIC_SUPPORTED`).
    pub host_native_atomics: bool,
}

fn tried(lib: &str) -> String {
    cudarc::get_lib_name_candidates(lib).join(", ")
}

/// Looks for a CUDA driver and device 0.
///
/// # Errors
/// [`CudaError::NoDriver`] (no `libcuda`), [`CudaError::NoDevice`] (the
/// driver fails to initialise or has no device).
pub fn probe() -> Result<DriverInfo, CudaError> {
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver {
            tried: tried("cuda"),
        });
    }
    use cudarc::driver::result;
    result::init().map_err(|e| CudaError::NoDevice(format!("cuInit: {e:?}")))?;
    let mut version = 0;
    // SAFETY: the library is loaded (checked above); the pointer is valid.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::NoDevice(format!("cuDriverGetVersion: {r:?}")));
    }
    let devices = result::device::get_count()
        .map_err(|e| CudaError::NoDevice(format!("cuDeviceGetCount: {e:?}")))?;
    if devices < 1 {
        return Err(CudaError::NoDevice("the driver reports no device".into()));
    }
    let dev = result::device::get(0).map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
    let name = result::device::get_name(dev).unwrap_or_default();
    // SAFETY: `dev` is a device handle the driver gave.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0);
    Ok(DriverInfo {
        driver_version: version,
        devices: devices as usize,
        name,
        compute_capability: (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ),
        host_native_atomics: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HOST_NATIVE_ATOMIC_SUPPORTED,
        ) != 0,
    })
}

fn nvrtc_present() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoCompiler {
            tried: tried("nvrtc"),
        })
    }
}

/// NVRTC's version (major, minor).
///
/// # Errors
/// [`CudaError::NoCompiler`] without `libnvrtc`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    nvrtc_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked above); the pointers are valid.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Load(format!("nvrtcVersion: {r:?}")));
    }
    Ok((major, minor))
}

/// NVRTC's language options for every compile: C++17, and device code by
/// default — a handler's helper functions need no `__device__` (the loop's
/// host-only parts are behind `RK_ARCH_CUDA`).
const LANGUAGE: [&str; 2] = ["--std=c++17", "--device-as-default-execution-space"];

/// Compiles a translation unit (see [`translation_unit`](crate::translation_unit))
/// to PTX for `arch` (e.g. `"sm_90"`) with NVRTC — no driver or GPU
/// needed.
///
/// # Errors
/// [`CudaError::NoCompiler`] without `libnvrtc`; [`CudaError::Compile`]
/// with NVRTC's log when the source does not compile.
pub fn compile_ptx(tu: &str, arch: &'static str) -> Result<String, CudaError> {
    nvrtc_present()?;
    if tu.contains('\0') {
        return Err(CudaError::Compile {
            log: "the source contains a NUL byte".into(),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some("ringkernel_actor_host.cu".into()),
        options: LANGUAGE.iter().map(|&o| o.into()).collect(),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(tu, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(CudaError::Compile {
            log: log.to_string_lossy().into_owned(),
        }),
        Err(e) => Err(CudaError::Compile {
            log: format!("{e:?}"),
        }),
    }
}

/// Compiles a translation unit with NVRTC straight to a cubin for `arch`
/// (a real architecture, e.g. `"sm_90"`): machine code, which a driver of
/// the same CUDA major loads whatever NVRTC minor made it (PTX from a newer
/// NVRTC than the driver would not load).
///
/// # Errors
/// [`CudaError::NoCompiler`] without `libnvrtc`; [`CudaError::Compile`]
/// with NVRTC's log.
pub fn compile_cubin(tu: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    nvrtc_present()?;
    let src = std::ffi::CString::new(tu).map_err(|_| CudaError::Compile {
        log: "the source contains a NUL byte".into(),
    })?;
    let name = c"ringkernel_actor_host.cu";
    let prog = result::create_program(&src, Some(name)).map_err(|e| CudaError::Compile {
        log: format!("{e:?}"),
    })?;
    let options: Vec<String> = std::iter::once(format!("--gpu-architecture={arch}"))
        .chain(LANGUAGE.iter().map(|&o| o.into()))
        .collect();
    // SAFETY: `prog` is a live program; the options are valid strings.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let out = match compiled {
        Err(_) => {
            // SAFETY: `prog` is live; the log is NUL-terminated.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(CudaError::Compile { log })
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled; `size` is a valid out pointer.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has the size NVRTC reported.
            let r2 = if r == sys::nvrtcResult::NVRTC_SUCCESS {
                unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
            } else {
                r
            };
            if r2 == sys::nvrtcResult::NVRTC_SUCCESS && size > 0 {
                Ok(cubin)
            } else {
                Err(CudaError::Compile {
                    log: format!("no cubin for {arch}: {r2:?}"),
                })
            }
        }
    };
    // SAFETY: `prog` is live and destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}
