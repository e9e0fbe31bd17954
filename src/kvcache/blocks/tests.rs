use super::*;
use std::collections::HashSet;

/// `truncate_heads` leaves the pool exactly as one `truncate` per shortened head (tables,
/// lengths, the free list's order), ignores entries that are not shorter, and refuses a
/// wrong count or an unknown sequence without changing anything.
#[test]
fn truncate_heads_equals_truncate_per_head() {
    let mut p = BlockPool::new(2, 3, 4, 40).unwrap();
    for s in [1, 2] {
        p.add_seq(s).unwrap();
        for l in 0..2 {
            for h in 0..3 {
                let n = 3 + 5 * l + 4 * h + s;
                p.append(l, s, h, &(0..n as u32).collect::<Vec<_>>())
                    .unwrap();
            }
        }
    }
    let mut oracle = p.clone();
    // (layer, head) order: shorten some heads, keep others, one entry longer than its head.
    let lens: Vec<u32> = (0..6)
        .map(|j| {
            let (l, h) = (j / 3, j % 3);
            let len = p.len(l, 2, h).unwrap() as u32;
            match j {
                0 => 0,
                2 => len - 5,
                3 => len + 7,
                4 => len - 1,
                _ => len,
            }
        })
        .collect();
    let (mut evicted, mut freed) = (0, 0);
    for (j, &want) in lens.iter().enumerate() {
        let (l, h, want) = (j / 3, j % 3, want as usize);
        let len = oracle.len(l, 2, h).unwrap();
        if want < len {
            evicted += len - want;
            freed += oracle.truncate(l, 2, h, want).unwrap();
        }
    }
    assert_eq!(p.truncate_heads(2, &lens).unwrap(), (evicted, freed));
    assert!(evicted > 0 && freed > 0);
    assert_eq!(p.table(2).unwrap().blocks, oracle.table(2).unwrap().blocks);
    assert_eq!(p.table(2).unwrap().len, oracle.table(2).unwrap().len);
    assert_eq!(p.free, oracle.free);
    p.check().unwrap();
    assert!(p.truncate_heads(2, &lens[..5]).is_err());
    assert!(p.truncate_heads(9, &lens).is_err());
    assert_eq!(p.free, oracle.free);
}

#[test]
fn append_allocates_blocks_lazily_and_remove_frees_them() {
    let mut p = BlockPool::new(2, 2, 4, 10).unwrap();
    p.add_seq(7).unwrap();
    let s = p.append(0, 7, 1, &[0, 1, 2, 3, 4]).unwrap();
    // lowest block ids first: blocks 0 and 1
    assert_eq!(s, vec![0, 1, 2, 3, 4]);
    assert_eq!(p.len(0, 7, 1).unwrap(), 5);
    assert_eq!(p.used_blocks(), 2);
    let s2 = p.append(1, 7, 0, &[0, 1]).unwrap();
    assert_eq!(s2, vec![8, 9]);
    assert_eq!(p.append(0, 7, 1, &[5]).unwrap(), vec![5]);
    assert_eq!(p.positions(0, 7, 1).unwrap(), vec![0, 1, 2, 3, 4, 5]);
    p.check().unwrap();
    assert_eq!(
        p.append(0, 7, 0, &(0..40).collect::<Vec<_>>()),
        Err(BlockError::OutOfBlocks {
            needed: 10,
            free: 7,
            total: 10
        })
    );
    // failed append changed nothing
    assert_eq!(p.len(0, 7, 0).unwrap(), 0);
    p.remove_seq(7).unwrap();
    assert_eq!(p.free_blocks(), 10);
    p.check().unwrap();
    assert_eq!(p.remove_seq(7), Err(BlockError::UnknownSeq(7)));
}

#[test]
fn compaction_moves_tail_into_holes_and_frees_last_blocks() {
    let mut p = BlockPool::new(1, 1, 4, 4).unwrap();
    p.add_seq(0).unwrap();
    p.append(0, 0, 0, &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
        .unwrap();
    p.add_metric(0, 0, 0, &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.])
        .unwrap();
    // evict 1, 3, 8, 6, 0 -> new_len 5; holes 0, 1, 3 (<5); tail survivors 9, 7, 5
    let c = p.plan_compaction(0, 0, 0, &[1, 3, 8, 6, 0]).unwrap();
    assert_eq!(c.new_len, 5);
    assert_eq!(
        c.moves,
        vec![
            Move { from: 9, to: 0 },
            Move { from: 7, to: 1 },
            Move { from: 5, to: 3 }
        ]
    );
    assert_eq!(c.freed, vec![2]);
    p.apply(&c).unwrap();
    assert_eq!(p.positions(0, 0, 0).unwrap(), vec![19, 17, 12, 15, 14]);
    assert_eq!(p.metrics(0, 0, 0).unwrap(), vec![9., 7., 2., 5., 4.]);
    assert_eq!(p.free_blocks(), 2);
    p.check().unwrap();
    // repeated or out-of-range slots are refused
    assert!(matches!(
        p.plan_compaction(0, 0, 0, &[1, 1]),
        Err(BlockError::BadSlot { .. })
    ));
    assert!(matches!(
        p.plan_compaction(0, 0, 0, &[5]),
        Err(BlockError::BadSlot { .. })
    ));
}

#[test]
fn plan_from_heads_numbers_layers_and_skips_empty_heads() {
    let p = EvictionPlan::from_heads(vec![vec![1], vec![], vec![], vec![0, 2]], 2);
    let got: Vec<_> = p
        .heads
        .iter()
        .map(|h| (h.layer, h.kv_head, h.evict.clone()))
        .collect();
    assert_eq!(got, vec![(0, 0, vec![1]), (1, 1, vec![0, 2])]);
    assert_eq!(p.evicted(), 3);
}

#[test]
fn fork_copies_lengths_metrics_positions_into_own_blocks() {
    let mut p = BlockPool::new(2, 2, 4, 12).unwrap();
    p.add_seq(0).unwrap();
    p.append(0, 0, 0, &[0, 1, 2, 3, 4]).unwrap();
    p.append(1, 0, 1, &[0, 1]).unwrap();
    p.add_metric(0, 0, 0, &[5., 4., 3., 2., 1.]).unwrap();
    let copies = p.fork_seq(0, 1).unwrap();
    // The 2 + 1 blocks of 5 + 2 tokens copied, into blocks the source does not own.
    assert_eq!(copies.len(), 3);
    let src: HashSet<usize> = [(0, 0), (1, 1)]
        .iter()
        .flat_map(|&(l, h)| p.table(0).unwrap().blocks[l][h].clone())
        .map(|b| b as usize)
        .collect();
    assert_eq!(src.len(), 3);
    assert!(copies
        .iter()
        .all(|m| src.contains(&m.from) && !src.contains(&m.to)));
    for (l, h) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        assert_eq!(p.len(l, 1, h).unwrap(), p.len(l, 0, h).unwrap());
        assert_eq!(p.positions(l, 1, h).unwrap(), p.positions(l, 0, h).unwrap());
        assert_eq!(p.metrics(l, 1, h).unwrap(), p.metrics(l, 0, h).unwrap());
    }
    assert_eq!(p.used_blocks(), 6);
    p.check().unwrap();
    // Independent afterwards: the copy's metric and removal leave the source alone.
    p.add_metric(0, 1, 0, &[1.; 5]).unwrap();
    assert_eq!(p.metrics(0, 0, 0).unwrap(), vec![5., 4., 3., 2., 1.]);
    p.remove_seq(1).unwrap();
    assert_eq!(p.used_blocks(), 3);
    p.check().unwrap();
    // Not enough blocks: an error, nothing allocated.
    let mut small = BlockPool::new(1, 1, 4, 3).unwrap();
    small.add_seq(0).unwrap();
    small.append(0, 0, 0, &[0, 1, 2, 3, 4]).unwrap();
    assert!(matches!(
        small.fork_seq(0, 1),
        Err(BlockError::OutOfBlocks {
            needed: 2,
            free: 1,
            ..
        })
    ));
    assert_eq!(small.free_blocks(), 1);
    assert!(small.table(1).is_err());
    assert!(matches!(p.fork_seq(0, 0), Err(BlockError::DuplicateSeq(0))));
}

#[test]
fn memory_layout_counts_metadata() {
    let m = MemoryLayout {
        block_size: 16,
        head_dim: 64,
        dtype_bytes: 4,
    };
    // 16 * (2*64*4 + 8) + 4
    assert_eq!(m.bytes_per_block(), 16 * 520 + 4);
    assert_eq!(m.blocks_for_bytes(3 * 8324 + 5).unwrap(), 3);
    assert!(matches!(
        m.blocks_for_bytes(100),
        Err(BlockError::TooSmall { .. })
    ));
    let mut p = BlockPool::new(1, 1, 16, 3).unwrap();
    p.add_seq(0).unwrap();
    p.append(0, 0, 0, &[0; 17]).unwrap();
    let r = p.report(&m);
    assert_eq!((r.used_blocks, r.free_blocks), (2, 1));
    assert_eq!(r.used_bytes, 2 * 8324);
}
