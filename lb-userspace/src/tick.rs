//! The kernel's tick rate (CONFIG_HZ), which the datapath's clock counts in: it is not exposed
//! to userspace, so the agent counts ticks over a measured interval and takes the nearest rate
//! a kernel can be built with.
use std::time::Duration;

/// The rates Kconfig offers (CONFIG_HZ_100 ... CONFIG_HZ_1000).
pub const RATES: [u64; 4] = [100, 250, 300, 1000];

/// The tick rate nearest to `ticks` counted in `elapsed`.
pub fn nearest_rate(ticks: u64, elapsed: Duration) -> u64 {
    let measured = ticks as f64 / elapsed.as_secs_f64().max(1e-9);
    RATES
        .into_iter()
        .min_by(|a, b| {
            let da = (*a as f64 - measured).abs();
            let db = (*b as f64 - measured).abs();
            da.total_cmp(&db)
        })
        .expect("RATES is not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_off_by_one_tick_over_100_ms_still_give_the_rate() {
        let window = Duration::from_millis(100);
        for hz in RATES {
            let expected = hz / 10;
            for ticks in [expected - 1, expected, expected + 1] {
                assert_eq!(nearest_rate(ticks, window), hz, "{ticks} ticks in 100 ms");
            }
        }
    }

    #[test]
    fn a_longer_interval_than_asked_for_is_accounted_for() {
        assert_eq!(nearest_rate(130, Duration::from_millis(130)), 1000);
        assert_eq!(nearest_rate(33, Duration::from_millis(131)), 250);
    }
}
