//! A token bucket: `rate` tokens a second, at most `2 * rate` saved up (a burst of twice the
//! rate). Pure: the caller passes the time. Used by the engine's registration rate limit
//! and the intake's per-class budgets.

use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate`.
    pub fn new(now: Instant, rate: u32) -> Self {
        Self {
            tokens: 2.0 * f64::from(rate),
            at: now,
        }
    }

    /// Takes one token if there is one. A `rate` of 0 means no limit.
    pub fn take(&mut self, now: Instant, rate: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(2.0 * rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_twice_the_rate_then_refills() {
        let now = Instant::now();
        let mut b = TokenBucket::new(now, 5);
        assert_eq!((0..100).filter(|_| b.take(now, 5)).count(), 10);
        assert!(b.take(now + Duration::from_millis(200), 5));
        assert!(!b.take(now + Duration::from_millis(200), 5));
        let mut free = TokenBucket::new(now, 0);
        assert!((0..1000).all(|_| free.take(now, 0)));
    }
}
