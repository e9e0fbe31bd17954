//! `kvc-plan-bench`: times KV-Compress's host-side block selection (the part of a compression
//! step that runs on the CPU) and prints a table.
//!
//! Shapes: SmolLM2 (30 layers x 3 kv-heads) and Llama-3.1-8B (32 x 8), each head holding
//! `--ctx` slots with random metrics and a protected window of 32 masked to +inf. Rows: a
//! continual-compression step (1 block over budget, what runs after nearly every decode step)
//! and a post-prefill step (half of the blocks evicted), for the partial selection kvc uses
//! ([`select_blocks`] + [`head_evictions`]) and the full-sort reference
//! ([`select_blocks_by_full_sort`], the straightforward form). Medians of `--iters` runs.
use clap::Parser;
use kvc::cuda::select::{head_evictions, select_blocks, select_blocks_by_full_sort};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Time KV-Compress's host-side block selection; prints a table")]
struct Args {
    /// Slots per head.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Timed runs per row (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

fn median_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let a = Args::parse();
    let bs = 16;
    println!(
        "# kvc-plan-bench: {} slots per head, block 16, protected window 32, random metrics; median of {} runs",
        a.ctx, a.iters
    );
    println!(
        "{:<22} {:<26} {:>14} {:>14} {:>8}",
        "shape", "step", "partial ms", "full sort ms", "speedup"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (name, heads) in [("SmolLM2 30x3", 90usize), ("Llama-3.1-8B 32x8", 256)] {
        let metrics: Vec<Vec<f32>> = (0..heads)
            .map(|_| {
                let mut m: Vec<f32> = (0..a.ctx).map(|_| rng.random::<f32>()).collect();
                let n = m.len();
                for x in m.iter_mut().skip(n.saturating_sub(32)) {
                    *x = f32::INFINITY;
                }
                m
            })
            .collect();
        let total_blocks = heads * a.ctx.div_ceil(bs);
        for (step, n_evict) in [
            ("continual (1 block)", 1),
            ("after prefill (half)", total_blocks / 2),
        ] {
            let partial = median_ms(a.iters, || {
                let counts = select_blocks(&metrics, bs, n_evict);
                for (m, &k) in metrics.iter().zip(&counts) {
                    std::hint::black_box(head_evictions(m, bs, k));
                }
            });
            let full = median_ms(a.iters, || {
                let counts = select_blocks_by_full_sort(&metrics, bs, n_evict);
                for (m, &k) in metrics.iter().zip(&counts) {
                    std::hint::black_box(head_evictions(m, bs, k));
                }
            });
            assert_eq!(
                select_blocks(&metrics, bs, n_evict),
                select_blocks_by_full_sort(&metrics, bs, n_evict)
            );
            println!(
                "{:<22} {:<26} {:>14.3} {:>14.3} {:>7.1}x",
                name,
                step,
                partial,
                full,
                full / partial
            );
        }
    }
}
