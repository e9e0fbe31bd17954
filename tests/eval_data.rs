//! LongBench readers: data.zip (deflated and stored members, streamed), the hub cache layout
//! offline, the checksum table, task selection errors.
mod common;

use common::{hub_cache_with, subset_rows, write_zip};
use kvc::data::longbench::{verdict, DataSource, Dataset, Verdict};
use kvc::hub::HubEnv;

#[test]
fn data_zip_members_stream_like_files() {
    let tmp = tempfile::tempdir().unwrap();
    let hotpot = subset_rows("hotpotqa", 40);
    let trec = subset_rows("trec", 3);
    for deflate in [true, false] {
        let z = tmp.path().join(format!("data-{deflate}.zip"));
        write_zip(
            &z,
            &[
                ("data/hotpotqa.jsonl", hotpot.as_bytes()),
                ("data/trec.jsonl", trec.as_bytes()),
            ],
            deflate,
        );
        let ds = Dataset::open(z.to_str().unwrap(), &HubEnv::from_env()).unwrap();
        assert_eq!(ds.source, DataSource::Zip(z.clone()));
        assert_eq!(ds.subsets().unwrap(), ["hotpotqa", "trec"]);
        let ids: Vec<String> = ds
            .rows("hotpotqa")
            .unwrap()
            .map(|r| r.unwrap().1.id)
            .collect();
        assert_eq!(ids.len(), 40);
        assert_eq!(ids[39], "hotpotqa-39");
        // The member's bytes hash like the file would.
        let dir = tmp.path().join("dir");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hotpotqa.jsonl"), &hotpot).unwrap();
        let plain = Dataset::open_path(&dir).unwrap();
        assert_eq!(
            ds.sha256("hotpotqa").unwrap(),
            plain.sha256("hotpotqa").unwrap()
        );
        let e = ds.require("lcc").unwrap_err().to_string();
        assert!(e.contains("`lcc`") && e.contains("hotpotqa, trec"), "{e}");
    }
    // A directory holding data.zip is read through it.
    let d2 = tmp.path().join("withzip");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::copy(tmp.path().join("data-true.zip"), d2.join("data.zip")).unwrap();
    let ds = Dataset::open_path(&d2).unwrap();
    assert!(matches!(ds.source, DataSource::Zip(_)));
}

#[test]
fn not_data_and_parquet_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Dataset::open_path(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("not LongBench data") && e.contains("hub"), "{e}");
    std::fs::create_dir_all(tmp.path().join("hotpotqa")).unwrap();
    std::fs::write(tmp.path().join("hotpotqa/test.parquet"), b"PAR1").unwrap();
    let e = Dataset::open_path(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("parquet") && e.contains("data.zip"), "{e}");
    let z = tmp.path().join("bad.zip");
    std::fs::write(&z, b"not a zip").unwrap();
    let ds = Dataset::open_path(&z).unwrap();
    let e = ds.subsets().unwrap_err().to_string();
    assert!(e.contains("bad.zip") && e.contains("zip"), "{e}");
}

#[test]
fn hub_dataset_is_found_in_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let zip_path = tmp.path().join("data.zip");
    write_zip(
        &zip_path,
        &[("data/trec.jsonl", subset_rows("trec", 2).as_bytes())],
        true,
    );
    let cache = tmp.path().join("hub");
    hub_cache_with(
        &cache,
        "THUDM/LongBench",
        commit,
        "data.zip",
        &std::fs::read(&zip_path).unwrap(),
    );
    let env = HubEnv {
        cache: cache.clone(),
        token: None,
        offline: true,
    };
    let ds = Dataset::open("hub", &env).unwrap();
    assert_eq!(ds.revision.as_deref(), Some(commit));
    assert_eq!(ds.hub_repo.as_deref(), Some("THUDM/LongBench"));
    assert_eq!(ds.rows("trec").unwrap().count(), 2);
    let ds = Dataset::open(&format!("hub:THUDM/LongBench@{commit}"), &env).unwrap();
    assert_eq!(ds.subsets().unwrap(), ["trec"]);
    // Offline and not cached: the error names the fix.
    let empty = HubEnv {
        cache: tmp.path().join("empty"),
        token: None,
        offline: true,
    };
    let e = Dataset::open("hub", &empty).unwrap_err().to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE=1") && e.contains("data.zip") && e.contains("THUDM/LongBench"),
        "{e}"
    );
}

#[test]
fn bundled_sample_rows_come_from_official_files() {
    // The bundled rows are official rows: every one parses with all eight fields.
    let ds = Dataset::open_path(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/datasets/longbench/sample"
    )))
    .unwrap();
    assert_eq!(
        ds.subsets().unwrap(),
        ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]
    );
    for s in ds.subsets().unwrap() {
        let rows: Vec<_> = ds.rows(&s).unwrap().map(|r| r.unwrap().1).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|r| r.dataset.as_deref() == Some(s.as_str())));
        // A subset of the official file: its sha256 is not the official one.
        assert!(matches!(
            verdict(&s, &ds.sha256(&s).unwrap()),
            Verdict::Differs { .. }
        ));
    }
}
