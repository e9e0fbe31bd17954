//! LongBench readers: data.zip (deflated and stored members, streamed), parquet (the mirror's
//! layout, checked row by row against the official JSONL), the hub cache layout offline (with
//! the parquet mirror as fallback), the checksum table, task selection errors.
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
fn not_data_and_bad_parquet_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Dataset::open_path(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("not LongBench data") && e.contains("hub"), "{e}");
    // A parquet file that names no subset.
    std::fs::create_dir_all(tmp.path().join("misc")).unwrap();
    std::fs::write(tmp.path().join("misc/train.parquet"), b"PAR1").unwrap();
    let e = Dataset::open_path(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("misc/train.parquet")
            && e.contains("no parquet file is named after a LongBench subset"),
        "{e}"
    );
    // A corrupt parquet file of a subset: reading it names the file.
    std::fs::create_dir_all(tmp.path().join("hotpotqa")).unwrap();
    std::fs::write(tmp.path().join("hotpotqa/test.parquet"), b"PAR1").unwrap();
    let ds = Dataset::open_path(tmp.path()).unwrap();
    assert_eq!(ds.subsets().unwrap(), ["hotpotqa"]);
    let e = ds
        .rows("hotpotqa")
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hotpotqa/test.parquet") && e.contains("parquet"),
        "{e}"
    );
    let z = tmp.path().join("bad.zip");
    std::fs::write(&z, b"not a zip").unwrap();
    let ds = Dataset::open_path(&z).unwrap();
    let e = ds.subsets().unwrap_err().to_string();
    assert!(e.contains("bad.zip") && e.contains("zip"), "{e}");
}

/// The parquet fixture (`tests/data/longbench_parquet/make.py`: pyarrow, snappy, the mirror's
/// `data/<subset>/test-00000-of-00001.parquet`) holds the bundled official rows.
fn parquet_fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/longbench_parquet")
}

fn official_rows(subset: &str) -> Vec<kvc::data::longbench::Row> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/longbench/sample");
    let ds = Dataset::open_path(&dir).unwrap();
    ds.rows(subset).unwrap().map(|r| r.unwrap().1).collect()
}

#[test]
fn parquet_rows_equal_the_official_jsonl_rows() {
    let ds = Dataset::open_path(&parquet_fixture()).unwrap();
    assert!(matches!(ds.source, DataSource::Parquet(_)));
    assert!(ds.is_mirror());
    assert_eq!(ds.subsets().unwrap(), ["multi_news", "multifieldqa_zh"]);
    for subset in ["multi_news", "multifieldqa_zh"] {
        let got: Vec<_> = ds.rows(subset).unwrap().map(|r| r.unwrap().1).collect();
        let want = official_rows(subset);
        assert_eq!(got.len(), want.len());
        assert_eq!(
            got, want,
            "{subset}: every field, answers and nulls included"
        );
        // Converted rows cannot be checked against the official bytes: said, not faked.
        assert!(matches!(
            ds.verdict(subset).unwrap(),
            Verdict::Mirror { .. }
        ));
    }
    // One file given directly: its subset comes from the parent directory.
    let f = parquet_fixture().join("data/multi_news/test-00000-of-00001.parquet");
    let one = Dataset::open_path(&f).unwrap();
    assert_eq!(one.subsets().unwrap(), ["multi_news"]);
    assert_eq!(one.rows("multi_news").unwrap().count(), 2);
}

#[test]
fn hub_falls_back_to_the_parquet_mirror_in_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    for subset in ["multi_news", "multifieldqa_zh"] {
        let rel = format!("data/{subset}/test-00000-of-00001.parquet");
        hub_cache_with(
            &cache,
            "Xnhyacinth/LongBench",
            commit,
            &rel,
            &std::fs::read(parquet_fixture().join(&rel)).unwrap(),
        );
    }
    let env = HubEnv {
        cache,
        token: None,
        offline: true,
    };
    // data.zip of THUDM/LongBench is not cached: the mirror's snapshot is used.
    let ds = Dataset::open("hub", &env).unwrap();
    assert_eq!(ds.hub_repo.as_deref(), Some("Xnhyacinth/LongBench"));
    assert_eq!(ds.revision.as_deref(), Some(commit));
    assert!(
        ds.description.contains("parquet mirror"),
        "{}",
        ds.description
    );
    let got: Vec<_> = ds
        .rows("multi_news")
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    assert_eq!(got, official_rows("multi_news"));
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
    // The bundled rows are official rows: every one parses with all eight fields. The binary
    // carries them (no checkout at run time), byte for byte the files in the repository.
    let ds = Dataset::bundled();
    let on_disk = Dataset::open_path(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/datasets/longbench/sample"
    )))
    .unwrap();
    assert_eq!(ds.subsets().unwrap(), on_disk.subsets().unwrap());
    for s in ds.subsets().unwrap() {
        assert_eq!(ds.sha256(&s).unwrap(), on_disk.sha256(&s).unwrap(), "{s}");
    }
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
