//! `scripts/gpu/kvpress-visit.sh` phase 3 (the RULER table's parallel groups) with a stand-in
//! `kvc` that writes rows in `kvc eval`'s layout (`model/<run>/rate<r>/preds/<subset>.jsonl`):
//! two calls, the second resuming the first's tree, must merge each group's own protocols back
//! and keep the full cache of the group that ran most of it. A mistake here costs GPU time
//! that cannot be had back (a visit once kept the wrong full cache), so it is checked on the CPU.
use std::path::Path;
use std::process::Command;

/// Appends one row per call to every run it is asked for; the full cache gets 3 rows per call
/// in the group whose methods contain "long", else 1 (so the groups' copies differ in length).
const STUB: &str = r#"#!/usr/bin/env bash
while [[ $# -gt 0 ]]; do case $1 in --methods) m=$2; shift;; --question-in-window) q=$2; shift;; --out) o=$2; shift;; esac; shift; done
row() { mkdir -p "$o/model/$1/rate2/preds"; echo "{\"by\":\"$m $q\"}" >> "$o/model/$1/rate2/preds/niah.jsonl"; }
if [[ $q != no ]]; then
  k=1; [[ $m == *long* ]] && k=3
  for i in $(seq $k); do mkdir -p "$o/model/full/rate1/preds"; echo "{\"by\":\"$m\"}" >> "$o/model/full/rate1/preds/niah.jsonl"; done
fi
for x in ${m//,/ }; do
  [[ $q == no ]] || row "$x"
  [[ $q == yes ]] || row "$x@context-only"
done
"#;

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn table_groups_merge_their_own_protocols_and_the_longest_full_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (stage, work, out) = (
        tmp.path().join("stage"),
        tmp.path().join("work"),
        tmp.path().join("out"),
    );
    std::fs::create_dir_all(&stage).unwrap();
    let kvc = stage.join("kvc");
    std::fs::write(&kvc, STUB).unwrap();
    Command::new("chmod").arg("+x").arg(&kvc).status().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu/kvpress-visit.sh");
    for call in 0..2 {
        let _ = std::fs::remove_file(work.join("visit/table"));
        let st = Command::new("bash")
            .arg(&script)
            .arg(&stage)
            .arg("300")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("VISIT_WORK", &work)
            .env("OUT", &out)
            .env("SKIP_SIDE", "1")
            .env("TABLE_GROUPS", "kvzip@yes;kvzip@no;h2o@no;lagkv,long")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "call {call}: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let model = work.join("table/model");
    let rows = |run: &str| lines(&model.join(run).join("rate2/preds/niah.jsonl"));
    // Each protocol's directory comes from the group that ran it, both calls' rows in it.
    assert_eq!(rows("kvzip"), vec![r#"{"by":"kvzip yes"}"#; 2]);
    assert_eq!(rows("kvzip@context-only"), vec![r#"{"by":"kvzip no"}"#; 2]);
    assert_eq!(rows("h2o@context-only"), vec![r#"{"by":"h2o no"}"#; 2]);
    assert!(!model.join("h2o").exists(), "h2o@no ran no in-window run");
    assert_eq!(rows("lagkv").len(), 2);
    assert_eq!(rows("lagkv@context-only").len(), 2);
    // The full cache with the most rows: the "long" group's, grown by both calls (3 + 3).
    let full = lines(&model.join("full/rate1/preds/niah.jsonl"));
    assert_eq!(full.len(), 6, "{full:?}");
    assert!(full.iter().all(|l| l.contains("lagkv,long")), "{full:?}");
    assert!(out.join("results.tar.gz").exists());
}
