//! Capped exponential backoff with jitter, for reconnecting to the head.

use std::time::Duration;

use rand::Rng;

/// Delay n (from 0) is uniform in `[d/2, d]` where `d = min(cap, base * 2^n)` ("equal jitter"):
/// never zero, never above the cap, and spread so that a thousand workers that lost the same head
/// do not all come back in the same millisecond.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap: cap.max(base), attempt: 0 }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + Duration::from_nanos(rng.random_range(0..=(d - half).as_nanos() as u64))
    }

    /// Sleeps the next delay; returns false at once if `cancel` fires first (a worker waiting out a
    /// head outage still stops promptly on SIGTERM).
    pub async fn wait(&mut self, rng: &mut impl Rng, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let d = self.next_delay(rng);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// After a successful join: start again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn grows_doubles_and_caps_with_jitter_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let c = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
            ceilings.push(c.as_millis());
        }
        assert_eq!(&ceilings[..7], &[100, 200, 400, 800, 1600, 3200, 5000]);
        assert!(ceilings[7..].iter().all(|&c| c == 5000), "capped: {ceilings:?}");
    }

    #[test]
    fn jitter_spreads_workers_apart() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(5)).next_delay(&mut rng))
            .collect();
        assert!(delays.len() > 40, "only {} distinct delays out of 50", delays.len());
    }

    #[test]
    fn reset_starts_over_and_huge_attempts_do_not_overflow() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Backoff::default();
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(5));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_follow_the_schedule_on_virtual_time_and_stop_on_cancel() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let start = tokio::time::Instant::now();
        for _ in 0..8 {
            assert!(b.wait(&mut rng, &token).await);
        }
        let took = start.elapsed();
        // Ceilings 0.1+0.2+0.4+0.8+1.6+3.2+5+5 = 16.3 s; each delay is at least half its ceiling.
        assert!(took >= Duration::from_millis(8150) && took <= Duration::from_millis(16300), "{took:?}");

        let t2 = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            t2.cancel();
        });
        let before = tokio::time::Instant::now();
        assert!(!b.wait(&mut rng, &token).await, "cancelled");
        assert_eq!(before.elapsed(), Duration::from_millis(300), "returned at the cancel, not after the 2.5-5 s delay");
    }
}
