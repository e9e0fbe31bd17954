//! Model (and data) resolution: a local checkpoint directory | a `.gguf` file | a Hugging Face
//! hub id with optional `@revision` | a short alias.
//!
//! Hub files live in the standard hub cache (`models--org--name/{blobs,refs,snapshots}`), so
//! kvc shares downloads with Python tools. The cache directory is `HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`; the token is `HF_TOKEN`, else the file
//! `HF_HOME/token`; `HF_HUB_OFFLINE=1` forbids the network and reads the cache only.
//! hf-hub 0.4 reads only `HF_HOME` itself and its cache lookup does not accept a commit hash as
//! revision, so this module resolves those two things by hand (the cache layout is small and
//! documented); downloads go through hf-hub's sync API.
use std::path::{Path, PathBuf};

/// What a model argument resolves to.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    HfDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

/// A resolved model and the names runs record.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub source: ModelSource,
    /// Short name used for result directories (`smollm2-135m`, `Llama-3.1-8B-Instruct`).
    pub name: String,
    /// Hub id and revision when the model came from the hub.
    pub hub_id: Option<String>,
    pub revision: Option<String>,
}

/// Short aliases: (alias, hub id or embedded file, default max input length for LongBench).
pub const ALIASES: &[(&str, &str, usize)] = &[
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 127_500),
    (
        "llama-3.1-70b",
        "meta-llama/Llama-3.1-70B-Instruct",
        127_500,
    ),
    ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2", 31_500),
    ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", 7_500),
];

/// The embedded default model file name (fetched by `scripts/fetch-model.sh`).
pub const EMBEDDED_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },
    #[error("{path} is a directory without config.json: a checkpoint directory needs config.json, tokenizer.json and *.safetensors")]
    NotACheckpoint { path: PathBuf },
    #[error("the embedded model {EMBEDDED_GGUF} is not installed (looked in {looked}): run `scripts/fetch-model.sh` (or set KVC_MODELS_DIR)")]
    EmbeddedMissing { looked: String },
    #[error("{repo}@{rev}: {file} is not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading: unset HF_HUB_OFFLINE, or download it on a machine with network into the same cache")]
    OfflineMissing {
        repo: String,
        rev: String,
        file: String,
        cache: PathBuf,
    },
    #[error("{repo}@{rev}: downloading {file} failed: {msg} (gated models need HF_TOKEN; offline machines need HF_HUB_OFFLINE=1 and a filled cache)")]
    Download {
        repo: String,
        rev: String,
        file: String,
        msg: String,
    },
    #[error("{arg:?} is not a model: give a checkpoint directory, a .gguf file, a hub id like org/name[@revision], or one of the aliases {aliases}")]
    Unknown { arg: String, aliases: String },
}

/// Hub settings read from the environment.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub cache: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
}

impl HubEnv {
    /// Read `HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        HubEnv {
            cache,
            token,
            offline,
        }
    }
}

/// Model or dataset repository on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn cache_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// Look a file up in the hub cache: `<cache>/<kind>--org--name/snapshots/<commit>/<file>`,
/// where `<commit>` is `rev` itself when it is a 40-hex commit, else the content of `refs/<rev>`.
pub fn cached_file(
    cache: &Path,
    kind: RepoKind,
    repo: &str,
    rev: &str,
    file: &str,
) -> Option<PathBuf> {
    let p = cached_snapshot(cache, kind, repo, rev)?.0.join(file);
    p.exists().then_some(p)
}

/// Fetch `file` of `repo@rev` into the hub cache (or find it there) and return its path.
pub fn fetch_file(
    env: &HubEnv,
    kind: RepoKind,
    repo: &str,
    rev: &str,
    file: &str,
) -> Result<PathBuf, HubError> {
    if let Some(p) = cached_file(&env.cache, kind, repo, rev, file) {
        return Ok(p);
    }
    if env.offline {
        return Err(HubError::OfflineMissing {
            repo: repo.into(),
            rev: rev.into(),
            file: file.into(),
            cache: env.cache.clone(),
        });
    }
    let download_err = |msg: String| HubError::Download {
        repo: repo.into(),
        rev: rev.into(),
        file: file.into(),
        msg,
    };
    api_repo(env, kind, repo, rev)
        .map_err(download_err)?
        .get(file)
        .map_err(|e| download_err(e.to_string()))
}

/// The hf-hub handle of `repo@rev`, caching into `env.cache`.
fn api_repo(
    env: &HubEnv,
    kind: RepoKind,
    repo: &str,
    rev: &str,
) -> Result<hf_hub::api::sync::ApiRepo, String> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(env.cache.clone())
        .with_token(env.token.clone())
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| e.to_string())?;
    let t = match kind {
        RepoKind::Model => hf_hub::RepoType::Model,
        RepoKind::Dataset => hf_hub::RepoType::Dataset,
    };
    Ok(api.repo(hf_hub::Repo::with_revision(repo.into(), t, rev.into())))
}

/// The cached snapshot directory of `repo@rev` (`rev` a commit, or a ref in `refs/`), with
/// its commit.
pub fn cached_snapshot(
    cache: &Path,
    kind: RepoKind,
    repo: &str,
    rev: &str,
) -> Option<(PathBuf, String)> {
    let dir = cache.join(format!(
        "{}--{}",
        kind.cache_prefix(),
        repo.replace('/', "--")
    ));
    let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        std::fs::read_to_string(dir.join("refs").join(rev))
            .ok()?
            .trim()
            .to_string()
    };
    let p = dir.join("snapshots").join(&commit);
    p.is_dir().then_some((p, commit))
}

/// Every file of `repo@rev` whose name ends with `suffix`, in the hub cache: the cached
/// snapshot when it holds such files (offline too), else the repo's file list from the hub and
/// each matching file downloaded. Returns the snapshot directory and its commit.
pub fn fetch_matching(
    env: &HubEnv,
    kind: RepoKind,
    repo: &str,
    rev: &str,
    suffix: &str,
) -> Result<(PathBuf, String), HubError> {
    if let Some((dir, commit)) = cached_snapshot(&env.cache, kind, repo, rev) {
        if has_suffix(&dir, suffix, 4) {
            return Ok((dir, commit));
        }
    }
    let what = format!("*{suffix}");
    if env.offline {
        return Err(HubError::OfflineMissing {
            repo: repo.into(),
            rev: rev.into(),
            file: what,
            cache: env.cache.clone(),
        });
    }
    let err = |msg: String| HubError::Download {
        repo: repo.into(),
        rev: rev.into(),
        file: what.clone(),
        msg,
    };
    let api = api_repo(env, kind, repo, rev).map_err(err)?;
    let info = api.info().map_err(|e| err(e.to_string()))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.ends_with(suffix))
        .collect();
    if files.is_empty() {
        return Err(err(format!("the repository has no {what} file")));
    }
    for f in &files {
        api.get(f).map_err(|e| err(format!("{f}: {e}")))?;
    }
    cached_snapshot(&env.cache, kind, repo, &info.sha).ok_or_else(|| {
        err(format!(
            "downloaded, but no snapshot {} in the cache",
            info.sha
        ))
    })
}

fn has_suffix(dir: &Path, suffix: &str, depth: usize) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let p = e.path();
            p.to_string_lossy().ends_with(suffix)
                || (depth > 0 && p.is_dir() && has_suffix(&p, suffix, depth - 1))
        })
    })
}

/// Directories searched for the embedded model (and what `scripts/fetch-*.sh` put beside it):
/// `$KVC_MODELS_DIR`, `./models`, and `models/` beside the source tree the binary was built from.
pub fn embedded_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(d) = std::env::var("KVC_MODELS_DIR") {
        v.push(PathBuf::from(d));
    }
    v.push(PathBuf::from("models"));
    v.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    v
}

/// Resolve a model argument (see the module docs).
pub fn resolve_model(arg: &str, env: &HubEnv) -> Result<ResolvedModel, HubError> {
    let path = Path::new(arg);
    if let Some(&(alias, target, _)) = ALIASES.iter().find(|(a, _, _)| *a == arg) {
        if target.ends_with(".gguf") {
            let dirs = embedded_dirs();
            for d in &dirs {
                let p = d.join(target);
                if p.exists() {
                    return Ok(ResolvedModel {
                        source: ModelSource::Gguf(p),
                        name: alias.into(),
                        hub_id: None,
                        revision: None,
                    });
                }
            }
            let looked = dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(HubError::EmbeddedMissing { looked });
        }
        let mut r = resolve_hub(target, "main", env)?;
        r.name = alias.into();
        return Ok(r);
    }
    if arg.ends_with(".gguf") || path.is_file() {
        if !path.exists() {
            return Err(HubError::NotFound { path: path.into() });
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(ResolvedModel {
            source: ModelSource::Gguf(path.into()),
            name,
            hub_id: None,
            revision: None,
        });
    }
    if path.is_dir() {
        if !path.join("config.json").exists() {
            return Err(HubError::NotACheckpoint { path: path.into() });
        }
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| arg.to_string());
        return Ok(ResolvedModel {
            source: ModelSource::HfDir(path.into()),
            name,
            hub_id: None,
            revision: None,
        });
    }
    let (id, rev) = arg.split_once('@').unwrap_or((arg, "main"));
    let looks_like_id =
        id.split('/').count() == 2 && id.split('/').all(|p| !p.is_empty()) && !id.starts_with('.');
    if !looks_like_id || rev.is_empty() {
        if arg.contains('/') || arg.starts_with('.') {
            return Err(HubError::NotFound { path: path.into() });
        }
        let aliases = ALIASES.iter().map(|a| a.0).collect::<Vec<_>>().join(", ");
        return Err(HubError::Unknown {
            arg: arg.into(),
            aliases,
        });
    }
    resolve_hub(id, rev, env)
}

/// Fetch the files a checkpoint needs from the hub (cache first) and return its snapshot dir.
fn resolve_hub(id: &str, rev: &str, env: &HubEnv) -> Result<ResolvedModel, HubError> {
    let get = |f: &str| fetch_file(env, RepoKind::Model, id, rev, f);
    let config = get("config.json")?;
    get("tokenizer.json")?;
    for optional in ["tokenizer_config.json", "generation_config.json"] {
        match get(optional) {
            Ok(_) => {}
            Err(HubError::OfflineMissing { .. }) if env.offline => {}
            Err(HubError::Download { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let commit = dir.file_name().map(|s| s.to_string_lossy().into_owned());
    let name = id.rsplit('/').next().unwrap_or(id).to_string();
    Ok(ResolvedModel {
        source: ModelSource::HfDir(dir),
        name,
        hub_id: Some(id.into()),
        revision: commit,
    })
}

/// Default LongBench max input length for a resolved model (alias table, else by name).
pub fn default_max_input(model_name: &str) -> Option<usize> {
    let lower = model_name.to_ascii_lowercase();
    if let Some(a) = ALIASES.iter().find(|a| a.0 == lower) {
        return Some(a.2);
    }
    if lower.contains("llama-3.1") || lower.contains("llama-3-1") {
        Some(127_500)
    } else if lower.contains("mistral-7b-instruct-v0.2") {
        Some(31_500)
    } else if lower.contains("smollm2") {
        Some(7_500)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_cache(root: &Path, repo: &str, commit: &str, files: &[&str]) {
        let dir = root.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), commit).unwrap();
        let snap = dir.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
    }

    #[test]
    fn cached_file_follows_refs_and_commit_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        fake_cache(tmp.path(), "org/m", commit, &["config.json"]);
        let p = cached_file(tmp.path(), RepoKind::Model, "org/m", "main", "config.json").unwrap();
        assert!(p.ends_with(format!("snapshots/{commit}/config.json")));
        assert!(cached_file(tmp.path(), RepoKind::Model, "org/m", commit, "config.json").is_some());
        assert!(cached_file(tmp.path(), RepoKind::Model, "org/m", "v2", "config.json").is_none());
        assert!(cached_file(
            tmp.path(),
            RepoKind::Model,
            "org/m",
            "main",
            "tokenizer.json"
        )
        .is_none());
    }

    #[test]
    fn offline_miss_names_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let env = HubEnv {
            cache: tmp.path().into(),
            token: None,
            offline: true,
        };
        let e = resolve_model("org/absent@main", &env).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("HF_HUB_OFFLINE=1") && msg.contains("config.json"),
            "{msg}"
        );
    }

    #[test]
    fn offline_hit_resolves_sharded_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "89abcdef0123456789abcdef0123456789abcdef";
        fake_cache(
            tmp.path(),
            "org/m",
            commit,
            &[
                "config.json",
                "tokenizer.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ],
        );
        let snap = tmp
            .path()
            .join(format!("models--org--m/snapshots/{commit}"));
        std::fs::write(
            snap.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let env = HubEnv {
            cache: tmp.path().into(),
            token: None,
            offline: true,
        };
        let r = resolve_model("org/m", &env).unwrap();
        assert_eq!(r.source, ModelSource::HfDir(snap.clone()));
        assert_eq!(r.revision.as_deref(), Some(commit));
        // A missing shard is an error, not a silent partial load.
        std::fs::remove_file(snap.join("model-00002-of-00002.safetensors")).unwrap();
        let e = resolve_model("org/m", &env).unwrap_err().to_string();
        assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    }

    #[test]
    fn unknown_alias_lists_valid_ones() {
        let env = HubEnv {
            cache: "/nonexistent".into(),
            token: None,
            offline: true,
        };
        let e = resolve_model("llama-9", &env).unwrap_err().to_string();
        assert!(
            e.contains("llama-3.1-8b") && e.contains("smollm2-135m"),
            "{e}"
        );
    }
}
