//! Rotary position embeddings as transformers computes them: the `rope_type`s kvc implements
//! (`default`, `linear`, `llama3`), the two ways a `config.json` spells them, llama.cpp's
//! per-frequency factors (how a GGUF carries `llama3`), and the inverse frequencies the forward
//! pass rotates by.
//!
//! transformers >= 5 saves `rope_parameters: {rope_type, rope_theta, factor, ...}`; older
//! checkpoints carry `rope_theta` and `rope_scaling: {rope_type | type, factor, ...}` at the top
//! level. Both resolve to one [`Rope`]; a type kvc does not implement (`dynamic`, `yarn`,
//! `longrope`, per-layer-type parameters, a partial rotary factor) is an error, never a silent
//! fall back to plain RoPE.
use serde_json::Value;

/// transformers' default base when a config names none.
pub const DEFAULT_THETA: f64 = 10_000.0;

/// Frequency scaling on top of plain RoPE.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama-3.1's frequency-dependent scaling (low frequencies divided by `factor`, high ones
    /// kept, a smooth blend between the two wavelengths).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// One divisor per inverse frequency (`head_dim / 2` of them): llama.cpp's
    /// `rope_freqs.weight`, in which a Llama-3.1 GGUF stores the `llama3` scaling.
    Factors { factors: Vec<f32> },
}

/// The resolved RoPE of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Plain RoPE with base `theta`.
    pub fn plain(theta: f64) -> Rope {
        Rope {
            theta,
            scaling: None,
        }
    }

    /// Inverse frequencies `[head_dim / 2]`, f32 as transformers computes them
    /// (`1 / theta^(arange(0, d, 2) / d)`, then the scaling). Panics when `Factors` does not
    /// hold `head_dim / 2` factors (the GGUF loader checks it).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let d = head_dim;
        let mut f: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / (self.theta as f32).powf(i as f32 / d as f32))
            .collect();
        match &self.scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => f.iter_mut().for_each(|x| *x /= *factor as f32),
            Some(RopeScaling::Factors { factors }) => {
                assert_eq!(factors.len(), f.len(), "one RoPE factor per frequency");
                f.iter_mut().zip(factors).for_each(|(x, k)| *x /= k);
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                for x in f.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *x;
                    if wavelen > low_wavelen {
                        *x /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        *x = (1.0 - smooth) * *x / factor + smooth * *x;
                    }
                }
            }
        }
        f
    }

    /// Resolve the RoPE keys of a `config.json`: `rope_parameters` (transformers >= 5) and/or
    /// the top-level `rope_theta` + `rope_scaling`. When both forms are present they must agree.
    pub fn from_hf(
        rope_theta: Option<f64>,
        rope_scaling: Option<&Value>,
        rope_parameters: Option<&Value>,
    ) -> Result<Rope, String> {
        let legacy = Rope {
            theta: rope_theta.unwrap_or(DEFAULT_THETA),
            scaling: match rope_scaling {
                None | Some(Value::Null) => None,
                Some(v) => scaling_of(v, "rope_scaling")?,
            },
        };
        let params = match rope_parameters {
            None | Some(Value::Null) => return Ok(legacy),
            Some(v) => v,
        };
        let obj = params
            .as_object()
            .ok_or_else(|| format!("rope_parameters must be an object, found {params}"))?;
        let single = ["rope_type", "type", "rope_theta"]
            .iter()
            .any(|k| obj.contains_key(*k));
        if !single && obj.values().all(Value::is_object) && !obj.is_empty() {
            let kinds: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!(
                "rope_parameters per layer type ({}) is not supported: kvc runs llama-family models with one RoPE for every layer",
                kinds.join(", ")
            ));
        }
        let theta = match obj.get("rope_theta") {
            Some(t) => t
                .as_f64()
                .ok_or_else(|| format!("rope_parameters.rope_theta is not a number: {t}"))?,
            None => legacy.theta,
        };
        let rope = Rope {
            theta,
            scaling: scaling_of(params, "rope_parameters")?,
        };
        let legacy_given =
            rope_theta.is_some() || !matches!(rope_scaling, None | Some(Value::Null));
        if legacy_given && legacy != rope {
            return Err(format!(
                "rope_parameters ({rope:?}) and the top-level rope_theta/rope_scaling ({legacy:?}) disagree: keep one of them"
            ));
        }
        Ok(rope)
    }
}

/// The scaling an HF rope object asks for (`key` names it in errors).
fn scaling_of(v: &Value, key: &str) -> Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if let Some(p) = v.get("partial_rotary_factor") {
        if p.as_f64() != Some(1.0) {
            return Err(format!(
                "{key}.partial_rotary_factor {p} is not supported (kvc rotates the whole head)"
            ));
        }
    }
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("{key}.{k} missing or not a number for rope_type {kind:?}"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(format!(
            "{key}: rope_type {other:?} is not supported (supported: \"default\", \"linear\", \"llama3\")"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama3() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    #[test]
    fn both_spellings_of_llama31_resolve_alike() {
        let old = Rope::from_hf(
            Some(500000.0),
            Some(
                &json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
            ),
            None,
        )
        .unwrap();
        let new = Rope::from_hf(
            None,
            None,
            Some(
                &json!({"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_type": "llama3"}),
            ),
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(new.theta, 500000.0);
        assert_eq!(new.scaling, Some(llama3()));
        // A default rope_parameters carries only the base.
        let plain = Rope::from_hf(
            None,
            None,
            Some(&json!({"rope_type": "default", "rope_theta": 1e6})),
        )
        .unwrap();
        assert_eq!(plain, Rope::plain(1e6));
    }

    #[test]
    fn unsupported_or_conflicting_rope_is_an_error() {
        for (params, needle) in [
            (
                json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
                "yarn",
            ),
            (json!({"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
            (
                json!({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}),
                "per layer type",
            ),
            (
                json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (
                json!({"rope_type": "llama3", "factor": 8.0}),
                "low_freq_factor",
            ),
        ] {
            let e = Rope::from_hf(None, None, Some(&params)).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = Rope::from_hf(
            Some(10000.0),
            None,
            Some(&json!({"rope_type": "default", "rope_theta": 500000.0})),
        )
        .unwrap_err();
        assert!(e.contains("disagree"), "{e}");
    }

    #[test]
    fn inv_freq_follows_the_scaling() {
        let d = 128;
        let plain = Rope::plain(500000.0).inv_freq(d);
        let lin = Rope {
            theta: 500000.0,
            scaling: Some(RopeScaling::Linear { factor: 4.0 }),
        }
        .inv_freq(d);
        for (p, l) in plain.iter().zip(&lin) {
            assert_eq!(*l, *p / 4.0);
        }
        let l3 = Rope {
            theta: 500000.0,
            scaling: Some(llama3()),
        }
        .inv_freq(d);
        // High frequencies (short wavelengths) are kept, the lowest divided by the factor.
        assert_eq!(l3[0], plain[0]);
        assert_eq!(l3[d / 2 - 1], plain[d / 2 - 1] / 8.0);
    }
}
