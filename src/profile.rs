//! Opt-in phase profile of the GPU forward and decode step (`KVC_PROFILE=1`).
//!
//! No profiler reaches the lent GPU machine (no Nsight there), and a step's host timers cannot
//! tell launch time from device time: launches return at once until the driver's queue fills,
//! then block for as long as the device is behind. With `KVC_PROFILE=1` every [`mark`]
//! synchronises the device and charges the time since the previous mark to its phase, so a
//! phase's total is its host work plus its own device work. The synchronisations slow the run
//! (the device idles while the host launches), so totals say where the time goes, not what an
//! unprofiled run takes. `KVC_PROFILE=host` marks without synchronising: a phase's total is
//! then the host's time to launch it (plus any wait when the driver's queue is full), which
//! says where a launch-bound step (batch-1 decode) spends its time. `kvc eval` and `kvc
//! bench-model` print the table to stderr at the end.
use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Whether `KVC_PROFILE` is set (to anything but `0`), read once.
pub fn enabled() -> bool {
    mode().is_some()
}

/// `KVC_PROFILE`: `None` unset (or `0`), `Some(true)` when marks synchronise the device (any
/// value but `host`), `Some(false)` for `host`.
fn mode() -> Option<bool> {
    static MODE: OnceLock<Option<bool>> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("KVC_PROFILE") {
        Ok(v) if v == "host" => Some(false),
        Ok(v) if v != "0" && !v.is_empty() => Some(true),
        _ => None,
    })
}

/// Whether marks synchronise the device (`KVC_PROFILE` set and not `host`).
fn synchronising() -> bool {
    mode() == Some(true)
}

fn table() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// A running phase clock; [`mark`] charges and restarts it.
pub struct Clock(Instant);

/// Start a clock (after synchronising `dev`, so earlier work is not charged, unless `host`).
/// No-op cost when profiling is off.
pub fn start(dev: &Device) -> Clock {
    if synchronising() {
        let _ = dev.synchronize();
    }
    Clock(Instant::now())
}

/// Charge the time since the clock's last mark (after synchronising `dev`, unless `host`) to
/// `phase`.
pub fn mark(dev: &Device, clock: &mut Clock, phase: &'static str) {
    if !enabled() {
        return;
    }
    if synchronising() {
        let _ = dev.synchronize();
    }
    let ms = clock.0.elapsed().as_secs_f64() * 1e3;
    if let Ok(mut t) = table().lock() {
        let e = t.entry(phase).or_default();
        e.0 += ms;
        e.1 += 1;
    }
    clock.0 = Instant::now();
}

/// The phases' totals, largest first (empty when profiling is off or nothing was marked).
pub fn report() -> String {
    let Ok(t) = table().lock() else {
        return String::new();
    };
    if t.is_empty() {
        return String::new();
    }
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    // Phases named `outer/inner` run inside another phase: not added to the total.
    let total: f64 = rows
        .iter()
        .filter(|r| !r.0.contains('/'))
        .map(|r| r.1 .0)
        .sum();
    let mut s = format!(
        "KVC_PROFILE ({}; {total:.0} ms in the top-level phases; \
         `a/b` runs inside `a`)\n{:<28} {:>10} {:>8} {:>10}\n",
        if synchronising() {
            "each phase synchronised"
        } else {
            "host time: launches, not synchronised"
        },
        "phase",
        "total ms",
        "%",
        "calls"
    );
    for (name, (ms, n)) in rows {
        s += &format!(
            "{name:<28} {ms:>10.1} {:>7.1}% {n:>10}\n",
            100.0 * ms / total.max(1e-9)
        );
    }
    s
}
