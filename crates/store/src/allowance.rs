//! Request allowances kept in the store (see [`crate::Store::take_allowance`]), so that the
//! processes sharing one store (the nodes of a PostgreSQL deployment) draw on one allowance
//! per key, and a restart does not refill it.
//!
//! The rule is the generic cell rate algorithm (GCRA), as `governor` applies it in memory: a
//! key's whole state is one instant, its *theoretical arrival time* (TAT). A request at `now`
//! moves it to `max(TAT, now) + interval`, and is refused, moving nothing, if that lands more
//! than `burst × interval` after `now`. A TAT at or before `now` is a full allowance, the
//! same as no row at all, so the backends delete such rows as they go, once they have been
//! full for [`PRUNE_IDLE_US`] (a key in steady use keeps its row, updated in place).

use std::num::NonZeroU32;
use std::time::Duration;

use time::OffsetDateTime;

use crate::StoreError;

/// What an allowance is for: each scope keeps its own state per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateScope {
    /// `POST …/verify`, per owner: each call answers whether a guess is the stored value.
    Verify,
}

impl RateScope {
    /// The name stored with each key's state.
    pub fn as_str(self) -> &'static str {
        match self {
            RateScope::Verify => "verify",
        }
    }
}

/// `per_minute` requests a minute per key, all of them at once at most (a full allowance);
/// spent, one more every `60 s / per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// What the allowance is for.
    pub scope: RateScope,
    /// Requests a minute, and the most taken at once.
    pub per_minute: NonZeroU32,
}

impl RateLimit {
    /// `per_minute` requests a minute under `scope`.
    pub fn per_minute(scope: RateScope, per_minute: NonZeroU32) -> Self {
        RateLimit { scope, per_minute }
    }

    /// Microseconds between two requests once the allowance is spent.
    pub(crate) fn interval_us(self) -> i64 {
        (60_000_000 / i64::from(self.per_minute.get())).max(1)
    }

    /// How far ahead of now a TAT may move: the whole allowance's worth of intervals.
    pub(crate) fn tolerance_us(self) -> i64 {
        self.interval_us()
            .saturating_mul(i64::from(self.per_minute.get()))
    }

    /// One request at `now_us` against a key whose TAT is `tat_us` (`None`: no state, a full
    /// allowance): the new TAT to store, or how long until one request is free again.
    ///
    /// A TAT more than the tolerance ahead can only come from a clock that ran ahead (another
    /// node's, or this one's before it was stepped back); it counts as a spent allowance, not
    /// as a lock-out for as long as the clock was off.
    pub(crate) fn take(self, tat_us: Option<i64>, now_us: i64) -> Result<i64, Duration> {
        let (interval, tolerance) = (self.interval_us(), self.tolerance_us());
        let next = tat_us
            .unwrap_or(now_us)
            .min(now_us.saturating_add(tolerance))
            .max(now_us)
            .saturating_add(interval);
        let ahead = next.saturating_sub(now_us);
        if ahead <= tolerance {
            Ok(next)
        } else {
            let wait_us = u64::try_from(ahead - tolerance).unwrap_or(u64::MAX);
            Err(Duration::from_micros(wait_us))
        }
    }
}

/// How far past the tolerance a TAT may be before a refused request pulls it back: nodes'
/// clocks minutes apart leave it as it is (a node running behind would otherwise pull back
/// what the others took, and grant more than one allowance across them).
pub(crate) const PULL_BACK_MARGIN_US: i64 = 5 * 60 * 1_000_000;

impl RateLimit {
    /// The TAT to store for a refused request at `now_us` whose key's TAT is `tat_us`: a TAT
    /// more than [`PULL_BACK_MARGIN_US`] past the tolerance (a clock that ran ahead) comes
    /// back to that, so that the allowance refills within minutes; without it, every request
    /// was refused (each clamping what it read, none saving it) until real time caught up
    /// with the clock that ran ahead.
    pub(crate) fn pulled_back(self, tat_us: Option<i64>, now_us: i64) -> Option<i64> {
        let most = now_us
            .saturating_add(self.tolerance_us())
            .saturating_add(PULL_BACK_MARGIN_US);
        tat_us.filter(|&t| t > most).map(|_| most)
    }
}

/// How many rows of spent-and-refilled state one take deletes at most: each take adds at most
/// one row, so the table stays near the number of keys used in the last minute or so.
pub(crate) const PRUNE_PER_TAKE: i64 = 16;

/// How long a row stays after its allowance is full again before a take deletes it. Without
/// the wait, a key whose allowance refills between two of its requests (a generous limit)
/// lost its row to another key's take each time and inserted it again: a delete and an
/// insert per request instead of an update in place.
pub(crate) const PRUNE_IDLE_US: i64 = 60_000_000;

/// The TAT at or before which rows are deleted by a take at `now_us`.
pub(crate) fn prune_before(now_us: i64) -> i64 {
    now_us.saturating_sub(PRUNE_IDLE_US)
}

/// Unix microseconds, the stored form of a TAT.
pub(crate) fn to_micros(t: OffsetDateTime) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos() / 1_000)
        .map_err(|_| StoreError::InvalidInput("timestamp out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_a_minute() -> RateLimit {
        RateLimit::per_minute(RateScope::Verify, NonZeroU32::new(3).unwrap())
    }

    #[test]
    fn a_full_allowance_is_taken_at_once_then_one_per_interval() {
        let limit = three_a_minute();
        let now = 1_000_000_000_i64;
        let mut tat = None;
        for i in 1..=3 {
            let next = limit.take(tat, now).expect("within the allowance");
            assert_eq!(next, now + i * 20_000_000);
            tat = Some(next);
        }
        // Spent: the next one is free once the first interval has passed.
        assert_eq!(
            limit.take(tat, now),
            Err(Duration::from_secs(20)),
            "refused, with the wait"
        );
        assert_eq!(
            limit.take(tat, now + 19_999_999),
            Err(Duration::from_micros(1))
        );
        assert_eq!(
            limit.take(tat, now + 20_000_000),
            Ok(now + 80_000_000),
            "one more after 20 s"
        );
    }

    #[test]
    fn state_in_the_past_is_a_full_allowance() {
        let limit = three_a_minute();
        let now = 5_000_000_000_i64;
        assert_eq!(limit.take(Some(now - 1), now), limit.take(None, now));
        assert_eq!(limit.take(Some(0), now), Ok(now + 20_000_000));
    }

    #[test]
    fn extreme_inputs_neither_panic_nor_let_requests_through() {
        let limit = RateLimit::per_minute(RateScope::Verify, NonZeroU32::MAX);
        // The interval rounds up to 1 µs, and the clock's end saturates instead of wrapping.
        assert_eq!(limit.take(None, i64::MAX), Ok(i64::MAX));
        assert_eq!(limit.take(None, 0), Ok(1));
        let one = RateLimit::per_minute(RateScope::Verify, NonZeroU32::MIN);
        assert_eq!(one.take(Some(60_000_000), 0), Err(Duration::from_secs(60)));
        // A TAT far ahead (a clock that ran ahead) is a spent allowance, not a lock-out.
        assert_eq!(one.take(Some(i64::MAX), 0), Err(Duration::from_secs(60)));
        let three = three_a_minute();
        assert_eq!(
            three.take(Some(3_600_000_000), 0),
            Err(Duration::from_secs(20))
        );
    }
}
