//! NCCL's [`Comm`] for tensor-parallel ranks on GPUs (CUDA builds). Its twin is
//! [`super::comm::ThreadComm`] (same contracts on host memory).
//!
//! Why by hand (dlopen of `libnccl.so.2` through `libloading`, seven entry points) and not
//! cudarc's `nccl` module: cudarc follows one linking mode for all its libraries, and candle
//! builds it with `dynamic-linking`, so its NCCL would make every CUDA build of kvc need
//! libnccl to start, tensor parallel or not. Loaded at run time, NCCL is needed only by a run
//! with `--tensor-parallel` above 1 on GPUs: from `KVC_NCCL_LIB` (a path), else the loader's
//! search path, else the error names both fixes (NVIDIA's PyPI wheel `nvidia-nccl-cu13`
//! ships `nvidia/nccl/lib/libnccl.so.2`; PyTorch installs it).
//!
//! Each collective runs on candle's stream of the tensor's device, so it is ordered after the
//! kernels that wrote its input and before those that read its output, as candle's own ops.
use candle_core::Result;
use std::ffi::c_char;

pub use gpu::NcclComm;

/// `ncclUniqueId`: 128 bytes made by rank 0 and handed to every rank before they meet.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UniqueId {
    internal: [c_char; 128],
}

impl UniqueId {
    /// A new id (rank 0 makes it once per group).
    pub fn new() -> Result<UniqueId> {
        gpu::unique_id()
    }

    /// The id as 256 hex digits (to hand to other processes).
    pub fn to_hex(&self) -> String {
        self.internal
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect()
    }

    /// The id back from [`UniqueId::to_hex`].
    pub fn from_hex(s: &str) -> std::result::Result<UniqueId, String> {
        if s.len() != 256 || !s.is_ascii() {
            return Err(format!(
                "an NCCL id is 256 hex digits, got {} characters",
                s.len()
            ));
        }
        let mut id = UniqueId { internal: [0; 128] };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("an NCCL id is hex digits: {e}"))? as c_char;
        }
        Ok(id)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::UniqueId;
    use crate::cuda::comm::{Comm, Shard};
    use crate::cuda::launch::{base_ptr, cu, device};
    use candle_core::{DType, Result, Tensor};
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    /// NCCL's opaque communicator handle.
    type RawComm = *mut c_void;

    /// The entry points kvc calls (NCCL 2.x ABI, stable since 2.0).
    struct Lib {
        _lib: libloading::Library,
        version: c_int,
        get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
        comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> c_int,
        comm_destroy: unsafe extern "C" fn(RawComm) -> c_int,
        comm_abort: unsafe extern "C" fn(RawComm) -> c_int,
        all_reduce: unsafe extern "C" fn(
            *const c_void,
            *mut c_void,
            usize,
            c_int,
            c_int,
            RawComm,
            *mut c_void,
        ) -> c_int,
        all_gather: unsafe extern "C" fn(
            *const c_void,
            *mut c_void,
            usize,
            c_int,
            RawComm,
            *mut c_void,
        ) -> c_int,
        error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    }

    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();

    fn lib() -> Result<&'static Lib> {
        LIB.get_or_init(load)
            .as_ref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    fn load() -> std::result::Result<Lib, String> {
        let path = std::env::var("KVC_NCCL_LIB").unwrap_or_else(|_| "libnccl.so.2".into());
        // Safety: loading NCCL runs its initialisers, which only set up its own state.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            format!(
                "tensor parallel on GPUs needs NCCL: could not load {path} ({e}); install it \
             (`pip install nvidia-nccl-cu13`, or PyTorch's) and set \
             KVC_NCCL_LIB=<site-packages>/nvidia/nccl/lib/libnccl.so.2"
            )
        })?;
        // Safety: each symbol is NCCL's function of that name with the C signature above.
        unsafe {
            let sym = |name: &str| format!("{path}: no symbol {name}; is this NCCL 2?");
            let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = *lib
                .get(b"ncclGetVersion\0")
                .map_err(|_| sym("ncclGetVersion"))?;
            let mut version = 0;
            get_version(&mut version);
            Ok(Lib {
                version,
                get_unique_id: *lib
                    .get(b"ncclGetUniqueId\0")
                    .map_err(|_| sym("ncclGetUniqueId"))?,
                comm_init_rank: *lib
                    .get(b"ncclCommInitRank\0")
                    .map_err(|_| sym("ncclCommInitRank"))?,
                comm_destroy: *lib
                    .get(b"ncclCommDestroy\0")
                    .map_err(|_| sym("ncclCommDestroy"))?,
                comm_abort: *lib
                    .get(b"ncclCommAbort\0")
                    .map_err(|_| sym("ncclCommAbort"))?,
                all_reduce: *lib
                    .get(b"ncclAllReduce\0")
                    .map_err(|_| sym("ncclAllReduce"))?,
                all_gather: *lib
                    .get(b"ncclAllGather\0")
                    .map_err(|_| sym("ncclAllGather"))?,
                error_string: *lib
                    .get(b"ncclGetErrorString\0")
                    .map_err(|_| sym("ncclGetErrorString"))?,
                _lib: lib,
            })
        }
    }

    fn check(lib: &Lib, rc: c_int, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // Safety: NCCL returns a static string for every result code.
        let msg = unsafe { CStr::from_ptr((lib.error_string)(rc)) };
        Err(cu(format!(
            "{what}: NCCL error {rc}: {}",
            msg.to_string_lossy()
        )))
    }

    /// NCCL's code of a dtype (`ncclFloat16` 6, `ncclFloat32` 7, `ncclBfloat16` 9).
    fn nccl_dtype(dt: DType) -> Result<c_int> {
        match dt {
            DType::U32 => Ok(3),
            DType::F16 => Ok(6),
            DType::F32 => Ok(7),
            DType::BF16 => Ok(9),
            dt => Err(cu(format!(
                "NCCL collectives of {dt:?} (u32, f32, bf16, f16 only)"
            ))),
        }
    }

    /// One rank of an NCCL group: the communicator of this process's (or thread's) GPU.
    pub struct NcclComm {
        shard: Shard,
        raw: RawComm,
        /// Set once by [`Comm::abort`] (the communicator is then aborted, never destroyed).
        aborted: AtomicBool,
    }

    // Safety: an NCCL communicator may be used from any thread as long as calls on it are not
    // concurrent; kvc's forward calls it from one thread at a time (the model is `&mut`).
    unsafe impl Send for NcclComm {}
    unsafe impl Sync for NcclComm {}

    /// A new group id from NCCL.
    pub(super) fn unique_id() -> Result<UniqueId> {
        let lib = lib()?;
        let mut id = UniqueId { internal: [0; 128] };
        // Safety: NCCL writes the 128 bytes of the id it is given.
        check(
            lib,
            unsafe { (lib.get_unique_id)(&mut id) },
            "ncclGetUniqueId",
        )?;
        Ok(id)
    }

    impl NcclComm {
        /// Join the group `id` as `shard.rank` of `shard.world` on `dev`'s GPU (blocks until every
        /// rank has joined).
        pub fn join(id: &UniqueId, shard: Shard, dev: &candle_core::Device) -> Result<NcclComm> {
            let lib = lib()?;
            let candle_core::Device::Cuda(d) = dev else {
                return Err(cu("NCCL needs a CUDA device"));
            };
            d.cuda_stream().context().bind_to_thread().map_err(cu)?;
            let mut raw: RawComm = std::ptr::null_mut();
            let (world, rank) = (shard.world as c_int, shard.rank as c_int);
            // Safety: `raw` receives the new communicator; `id` is a valid NCCL id by value.
            let rc = unsafe { (lib.comm_init_rank)(&mut raw, world, *id, rank) };
            check(lib, rc, "ncclCommInitRank")?;
            Ok(NcclComm {
                shard,
                raw,
                aborted: AtomicBool::new(false),
            })
        }

        /// The loaded NCCL's version code (e.g. 22805 for 2.28.5).
        pub fn version() -> Result<i32> {
            Ok(lib()?.version)
        }
    }

    impl Drop for NcclComm {
        fn drop(&mut self) {
            if self.aborted.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(lib) = lib() {
                // Safety: the communicator was made by ncclCommInitRank and is dropped once.
                unsafe { (lib.comm_destroy)(self.raw) };
            }
        }
    }

    impl Comm for NcclComm {
        fn shard(&self) -> Shard {
            self.shard
        }

        fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
            let lib = lib()?;
            let x = x.contiguous()?;
            let out = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
            let stream = device(&x)?.cuda_stream();
            let (src, dst) = (base_ptr(&x, &stream)?, base_ptr(&out, &stream)?);
            // Safety: both buffers hold `elem_count` elements of the dtype on this rank's device;
            // the call is queued on candle's stream, which keeps `x` and `out` alive in order.
            let rc = unsafe {
                (lib.all_reduce)(
                    src as *const c_void,
                    dst as *mut c_void,
                    x.elem_count(),
                    nccl_dtype(x.dtype())?,
                    0, // ncclSum
                    self.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            check(lib, rc, "ncclAllReduce")?;
            Ok(out)
        }

        fn all_gather_last(&self, x: &Tensor) -> Result<Tensor> {
            let lib = lib()?;
            let world = self.shard.world;
            // NCCL gathers whole buffers rank after rank: gather `[world, rows, n]` with the last
            // dimension moved to the front, then put it back as `[rows, world * n]`.
            let dims = x.dims().to_vec();
            let n = *dims.last().ok_or_else(|| cu("gather of a scalar"))?;
            let rows = x.elem_count() / n.max(1);
            let x2 = x.reshape((rows, n))?.contiguous()?;
            let mut all_dims = vec![world];
            all_dims.extend([rows, n]);
            let out = Tensor::zeros(all_dims, x.dtype(), x.device())?;
            let stream = device(&x2)?.cuda_stream();
            let (src, dst) = (base_ptr(&x2, &stream)?, base_ptr(&out, &stream)?);
            // Safety: `out` holds `world` times `x2`'s elements; see `all_reduce_sum`.
            let rc = unsafe {
                (lib.all_gather)(
                    src as *const c_void,
                    dst as *mut c_void,
                    x2.elem_count(),
                    nccl_dtype(x.dtype())?,
                    self.raw,
                    stream.cu_stream() as *mut c_void,
                )
            };
            check(lib, rc, "ncclAllGather")?;
            let mut want = dims;
            *want.last_mut().expect("checked above") = world * n;
            out.transpose(0, 1)?
                .reshape((rows, world * n))?
                .reshape(want)
        }

        fn abort(&self, _why: &str) {
            if self.aborted.swap(true, Ordering::SeqCst) {
                return;
            }
            if let Ok(lib) = lib() {
                // Safety: aborting a live communicator (once) from any thread is what
                // ncclCommAbort is for: ranks blocked in its collectives return.
                unsafe { (lib.comm_abort)(self.raw) };
            }
        }
    }
}

/// Without the `cuda` feature: every entry point returns [`crate::cuda::OpsError::NoCuda`].
#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::UniqueId;
    use crate::cuda::comm::{Comm, Shard};
    use crate::cuda::OpsError;
    use candle_core::{Result, Tensor};

    pub(super) fn unique_id() -> Result<UniqueId> {
        Err(OpsError::NoCuda.into())
    }

    /// One rank of an NCCL group (never made without the `cuda` feature).
    pub struct NcclComm {
        shard: Shard,
    }

    impl NcclComm {
        pub fn join(_: &UniqueId, _: Shard, _: &candle_core::Device) -> Result<NcclComm> {
            Err(OpsError::NoCuda.into())
        }
        pub fn version() -> Result<i32> {
            Err(OpsError::NoCuda.into())
        }
    }

    impl Comm for NcclComm {
        fn shard(&self) -> Shard {
            self.shard
        }
        fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
            Err(OpsError::NoCuda.into())
        }
        fn all_gather_last(&self, _: &Tensor) -> Result<Tensor> {
            Err(OpsError::NoCuda.into())
        }
        fn abort(&self, _: &str) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_through_hex_and_bad_hex_is_named() {
        let mut id = UniqueId { internal: [0; 128] };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8 as c_char;
        }
        let back = UniqueId::from_hex(&id.to_hex()).unwrap();
        assert_eq!(back.internal, id.internal);
        assert!(UniqueId::from_hex("abc")
            .unwrap_err()
            .contains("256 hex digits"));
        assert!(UniqueId::from_hex(&"zz".repeat(128))
            .unwrap_err()
            .contains("hex digits"));
    }
}
