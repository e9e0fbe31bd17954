//! Weight sources: Hugging Face safetensors (single file or sharded index) and GGUF files.
//!
//! FP8 (e4m3) safetensors weights come with their `<name>_scale`: either kept in e4m3 for the
//! FP8 tensor-core matmuls ([`WeightSource::get_fp8_part`], `crate::cuda::fp8_linear`) or
//! dequantized at load ([`dequantize_fp8`]) to run in the run dtype (`--fp8`).
//!
//! Both hand out tensors under the Hugging Face names (`model.layers.3.self_attn.q_proj.weight`)
//! in the run dtype, so the forward pass in `llama.rs` has one code path. GGUF tensors are
//! dequantized at load (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32 and the other ggml types candle
//! knows) and their Q/K projections are un-permuted: llama.cpp's converter reorders the rows of
//! `attn_q`/`attn_k` for its interleaved RoPE; kvc, like transformers, uses the
//! half-rotation RoPE of the original checkpoints, so it applies the inverse permutation
//! (the same one transformers applies when it loads a GGUF).
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cuda::fp8_linear::Fp8Weight;
use crate::model::ModelError;

/// Where tensors come from.
pub enum WeightSource {
    Safetensors {
        files: Vec<PathBuf>,
        st: candle_core::safetensors::MmapedSafetensors,
    },
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        file: std::fs::File,
        heads: usize,
        kv_heads: usize,
    },
}

impl WeightSource {
    /// Open the safetensors of a checkpoint directory: `model.safetensors.index.json` shards, or
    /// every `*.safetensors` file when there is no index.
    pub fn safetensors_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                    path: index.clone(),
                    msg: format!("not a valid index: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Weights {
                    path: index.clone(),
                    msg: "no weight_map object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        files.sort();
        if files.is_empty() {
            return Err(ModelError::MissingFile {
                path: dir.join("model.safetensors"),
                hint: "a checkpoint directory needs model.safetensors or model.safetensors.index.json with its shards".into(),
            });
        }
        for f in &files {
            if !f.exists() {
                return Err(ModelError::MissingFile {
                    path: f.clone(),
                    hint: "a shard named in model.safetensors.index.json is missing: download it again".into(),
                });
            }
            // Parse each header now so a corrupt file is named (the multi-file open below
            // reports errors without the path).
            // SAFETY: the file is mapped read-only and only read while mapped.
            let mm = unsafe {
                memmap2::Mmap::map(&std::fs::File::open(f).map_err(|e| ModelError::io(f, e))?)
            }
            .map_err(|e| ModelError::io(f, e))?;
            safetensors::SafeTensors::read_metadata(&mm).map_err(|e| ModelError::Weights {
                path: f.clone(),
                msg: format!("corrupt or truncated safetensors file: {e}"),
            })?;
        }
        // SAFETY: read-only mmaps of files we just validated; the files must not change while
        // kvc runs (the same contract as candle's own loaders).
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                ModelError::Weights {
                    path: files[0].clone(),
                    msg: crate::model::candle_msg(&e),
                }
            })?;
        Ok(WeightSource::Safetensors { files, st })
    }

    /// Open a GGUF file (header and metadata are parsed here; tensors are read lazily).
    pub fn gguf(path: &Path) -> Result<(Self, HashMap<String, gguf_file::Value>), ModelError> {
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Weights {
            path: path.to_path_buf(),
            msg: format!(
                "not a readable GGUF file ({}); the download may be truncated: fetch it again",
                crate::model::candle_msg(&e)
            ),
        })?;
        let md = content.metadata.clone();
        Ok((
            WeightSource::Gguf {
                path: path.to_path_buf(),
                content,
                file,
                heads: 0,
                kv_heads: 0,
            },
            md,
        ))
    }

    /// Head counts are needed to undo llama.cpp's Q/K row permutation.
    pub fn set_heads(&mut self, n_heads: usize, n_kv: usize) {
        if let WeightSource::Gguf {
            heads, kv_heads, ..
        } = self
        {
            *heads = n_heads;
            *kv_heads = n_kv;
        }
    }

    /// Whether a tensor (by Hugging Face name) exists.
    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            WeightSource::Safetensors { st, .. } => st.get(hf_name).is_ok(),
            WeightSource::Gguf { content, .. } => {
                gguf_name(hf_name).is_some_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    /// A GGUF tensor by its GGUF name, dequantized and flattened to f32 on the host; `None`
    /// when the file has no such tensor (or the source is safetensors).
    pub fn gguf_f32(&mut self, gguf_name: &str) -> Result<Option<Vec<f32>>, ModelError> {
        let WeightSource::Gguf {
            path,
            content,
            file,
            ..
        } = self
        else {
            return Ok(None);
        };
        if !content.tensor_infos.contains_key(gguf_name) {
            return Ok(None);
        }
        let t = gguf_host(content, file, path, gguf_name)?;
        let v = t
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::Weights {
                path: path.clone(),
                msg: format!("tensor {gguf_name}: {}", crate::model::candle_msg(&e)),
            })?;
        Ok(Some(v))
    }

    /// Whether any tensor is FP8 (e4m3); false for a GGUF.
    pub fn has_fp8(&self) -> bool {
        match self {
            WeightSource::Safetensors { st, .. } => st
                .tensors()
                .iter()
                .any(|(_, v)| v.dtype() == safetensors::Dtype::F8_E4M3),
            WeightSource::Gguf { .. } => false,
        }
    }

    /// An FP8 weight's `part` (as in [`WeightSource::get_part`]) kept in e4m3, on the host:
    /// its bits `[rows, cols]` (U8) and one f32 scale per row. `None` when the tensor is not
    /// FP8 (or the source is a GGUF): load it with [`WeightSource::get_part`].
    pub fn get_fp8_part(
        &mut self,
        hf_name: &str,
        shape: &[usize],
        part: Option<(usize, std::ops::Range<usize>)>,
    ) -> Result<Option<(Tensor, Tensor)>, ModelError> {
        let origin = self.origin();
        let WeightSource::Safetensors { st, .. } = self else {
            return Ok(None);
        };
        match st.get(hf_name) {
            Ok(v) if v.dtype() == safetensors::Dtype::F8_E4M3 => {}
            _ => return Ok(None),
        }
        let w = load_host(st, &origin, hf_name)?;
        check_shape(&origin, hf_name, shape, &w)?;
        let scale = load_host(st, &origin, &format!("{hf_name}_scale"))?;
        fp8_bits_part(&w, &scale, part)
            .map(Some)
            .map_err(|msg| ModelError::Weights {
                path: origin,
                msg: format!("tensor {hf_name}: {msg}"),
            })
    }

    fn origin(&self) -> PathBuf {
        match self {
            WeightSource::Safetensors { files, .. } => {
                files[0].parent().unwrap_or(Path::new(".")).to_path_buf()
            }
            WeightSource::Gguf { path, .. } => path.clone(),
        }
    }

    /// Load `hf_name` with the expected `shape`, converted to `dtype` on `device`.
    pub fn get(
        &mut self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        self.get_part(hf_name, shape, None, dtype, device)
    }

    /// [`WeightSource::get`] of one part: `Some((dim, range))` keeps only `range` along `dim`
    /// (a tensor-parallel rank's rows or columns), cut on the host so only the part is
    /// converted and copied to `device`; `shape` is the whole tensor's.
    pub fn get_part(
        &mut self,
        hf_name: &str,
        shape: &[usize],
        part: Option<(usize, std::ops::Range<usize>)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let origin = self.origin();
        // `Some(t)`: the weight already cut to `part` (an FP8 weight is cut before it is
        // dequantized, so a rank never holds the whole tensor in f32).
        let mut cut = None;
        let t = match self {
            WeightSource::Safetensors { st, .. } => {
                let load = |name: &str| load_host(st, &origin, name);
                let t = load(hf_name)?;
                if t.dtype() == DType::F8E4M3 {
                    let scale = load(&format!("{hf_name}_scale"))?;
                    let w =
                        fp8_part(&t, &scale, part.clone()).map_err(|msg| ModelError::Weights {
                            path: origin.clone(),
                            msg: format!("tensor {hf_name}: {msg}"),
                        })?;
                    cut = Some(w);
                }
                t
            }
            WeightSource::Gguf {
                content,
                file,
                heads,
                kv_heads,
                ..
            } => {
                let g = gguf_name(hf_name).ok_or_else(|| ModelError::MissingTensor {
                    path: origin.clone(),
                    name: hf_name.to_string(),
                })?;
                if !content.tensor_infos.contains_key(&g) {
                    return Err(ModelError::MissingTensor {
                        path: origin.clone(),
                        name: format!("{g} ({hf_name})"),
                    });
                }
                let t = gguf_host(content, file, &origin, &g)?;
                let n = if hf_name.ends_with("self_attn.q_proj.weight") {
                    Some(*heads)
                } else if hf_name.ends_with("self_attn.k_proj.weight") {
                    Some(*kv_heads)
                } else {
                    None
                };
                match n {
                    Some(n) if n > 0 => unpermute_qk(&t, n).map_err(|e| ModelError::Weights {
                        path: origin.clone(),
                        msg: format!("tensor {g}: {}", crate::model::candle_msg(&e)),
                    })?,
                    _ => t,
                }
            }
        };
        check_shape(&origin, hf_name, shape, &t)?;
        let part = |t: Tensor| match (cut, part) {
            (Some(w), _) => Ok(w),
            // A copy of the part alone: `to_device` copies a view's whole storage.
            (None, Some((dim, r))) => t.narrow(dim, r.start, r.len())?.force_contiguous(),
            (None, None) => Ok(t),
        };
        part(t)
            .and_then(|t| t.to_dtype(dtype))
            .and_then(|t| t.to_device(device))
            .map_err(|e| ModelError::Weights {
                path: origin,
                msg: format!("tensor {hf_name}: {}", crate::model::candle_msg(&e)),
            })
    }
}

/// `name` from the safetensors `st` on the host; a tensor the files lack is
/// [`ModelError::MissingTensor`].
fn load_host(
    st: &candle_core::safetensors::MmapedSafetensors,
    origin: &Path,
    name: &str,
) -> Result<Tensor, ModelError> {
    st.load(name, &Device::Cpu).map_err(|e| {
        if st.get(name).is_err() {
            ModelError::MissingTensor {
                path: origin.to_path_buf(),
                name: name.to_string(),
            }
        } else {
            ModelError::Weights {
                path: origin.to_path_buf(),
                msg: format!("tensor {name}: {}", crate::model::candle_msg(&e)),
            }
        }
    })
}

/// `t` has the `shape` the config gives `name`, or [`ModelError::ShapeMismatch`].
fn check_shape(origin: &Path, name: &str, shape: &[usize], t: &Tensor) -> Result<(), ModelError> {
    if t.dims() == shape {
        return Ok(());
    }
    Err(ModelError::ShapeMismatch {
        path: origin.to_path_buf(),
        name: name.to_string(),
        expected: shape.to_vec(),
        got: t.dims().to_vec(),
    })
}

/// The `part` (dim, range) of an FP8 weight `[rows, cols]` dequantized to f32: cut first (a
/// per-row scale with its rows, [`fp8_bits_part`]), so only the part is ever in f32.
fn fp8_part(
    w: &Tensor,
    scale: &Tensor,
    part: Option<(usize, std::ops::Range<usize>)>,
) -> Result<Tensor, String> {
    let (w, scale) = fp8_bits_part(w, scale, part)?;
    Fp8Weight { w, scale }
        .dequantize()
        .map_err(|e| crate::model::candle_msg(&e))
}

/// The `part` of an FP8 weight `[rows, cols]` as e4m3 bits (U8) and its scales as one f32 per
/// row (a per-tensor scale repeated), both on the host.
fn fp8_bits_part(
    w: &Tensor,
    scale: &Tensor,
    part: Option<(usize, std::ops::Range<usize>)>,
) -> Result<(Tensor, Tensor), String> {
    let msg = |e: candle_core::Error| crate::model::candle_msg(&e);
    let rows = w.dim(0).map_err(msg)?;
    let s = scale
        .to_dtype(DType::F32)
        .and_then(|s| s.flatten_all())
        .and_then(|s| s.to_vec1::<f32>())
        .map_err(msg)?;
    let s = match s.len() {
        1 => vec![s[0]; rows],
        n if n == rows => s,
        _ => {
            return Err(format!(
            "FP8 scale of shape {:?}: kvc reads per-tensor or per-row scales, not block-wise ones",
            scale.dims()
        ))
        }
    };
    let (w, s) = match part {
        None => (w.clone(), s),
        Some((0, r)) => (w.narrow(0, r.start, r.len()).map_err(msg)?, s[r].to_vec()),
        Some((dim, r)) => (w.narrow(dim, r.start, r.len()).map_err(msg)?, s),
    };
    let (rows, cols) = w.dims2().map_err(msg)?;
    let bits: Vec<u8> = w
        .flatten_all()
        .and_then(|w| w.to_vec1::<float8::F8E4M3>())
        .map_err(msg)?
        .iter()
        .map(|b| b.to_bits())
        .collect();
    let n = s.len();
    let bits = Tensor::from_vec(bits, (rows, cols), &Device::Cpu).map_err(msg)?;
    Ok((bits, Tensor::from_vec(s, n, &Device::Cpu).map_err(msg)?))
}

/// GGUF tensor `g` read and dequantized on the host (llama.cpp's row layout, as stored).
fn gguf_host(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    origin: &Path,
    g: &str,
) -> Result<Tensor, ModelError> {
    let err = |msg: String| ModelError::Weights {
        path: origin.to_path_buf(),
        msg,
    };
    let q = content
        .tensor(file, g, &Device::Cpu)
        .map_err(|e| err(format!("tensor {g}: {}", crate::model::candle_msg(&e))))?;
    q.dequantize(&Device::Cpu).map_err(|e| {
        err(format!(
            "dequantizing {g} ({:?}): {}",
            q.dtype(),
            crate::model::candle_msg(&e)
        ))
    })
}

/// An FP8 (e4m3) weight `[rows, cols]` times its scale, in f32: the scale is one number
/// (per-tensor: shape `[]` or `[1]`) or one per output row (per-channel: `[rows]` or
/// `[rows, 1]`), as fbgemm_fp8 and compressed-tensors checkpoints store `<name>_scale`.
pub fn dequantize_fp8(w: &Tensor, scale: &Tensor) -> Result<Tensor, String> {
    fp8_part(w, scale, None)
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows grouped per head as (pairs, 2) go back to
/// (2, pairs), i.e. interleaved RoPE layout -> half-rotation layout.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    w.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// llama.cpp's `permute(w, n_head)` (what its converter does); used by tests that write GGUFs.
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    w.reshape((n_head, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Hugging Face tensor name -> GGUF tensor name (llama architecture).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let g = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank's part of an FP8 weight, by rows (with its per-row scales) or by columns, per-row
    /// or per-tensor scales: the same numbers as the part of the whole dequantized weight.
    #[test]
    fn fp8_parts_equal_the_part_of_the_whole() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) * 0.37).collect();
        let w = Tensor::from_vec(v, (4, 6), &dev)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let per_row = Tensor::new(&[0.5f32, 2.0, 0.25, 4.0], &dev).unwrap();
        let per_tensor = Tensor::new(&[3.0f32], &dev).unwrap();
        for scale in [per_row, per_tensor] {
            let whole = dequantize_fp8(&w, &scale).unwrap();
            for (dim, r) in [(0, 1..3), (1, 3..6), (0, 0..4)] {
                let got = fp8_part(&w, &scale, Some((dim, r.clone()))).unwrap();
                let want = whole.narrow(dim, r.start, r.len()).unwrap();
                assert_eq!(
                    got.to_vec2::<f32>().unwrap(),
                    want.to_vec2::<f32>().unwrap(),
                    "dim {dim} {r:?} scale {:?}",
                    scale.dims()
                );
            }
        }
    }

    #[test]
    fn permute_roundtrip_and_is_not_identity() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // head 0 rows (0,1,2,3) -> interleaved (0,2,1,3)
        let first: Vec<f32> = p.to_vec2::<f32>().unwrap().iter().map(|r| r[0]).collect();
        assert_eq!(first, vec![0.0, 6.0, 3.0, 9.0, 12.0, 18.0, 15.0, 21.0]);
    }

    #[test]
    fn names_map() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").unwrap(),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert!(gguf_name("model.layers.1.self_attn.rotary_emb.inv_freq").is_none());
    }
}
