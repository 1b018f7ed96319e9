//! The retry budget: retries may add at most a configured share of the request load, so a
//! failing site cannot make the proxy double the traffic on the other one.

use std::sync::atomic::{AtomicI64, Ordering};

/// One retry costs this many milli-tokens; every request deposits `ratio * COST`.
const COST: i64 = 1000;
/// Retries allowed before any request has deposited (a quiet proxy may still retry a few).
const RESERVE_RETRIES: i64 = 10;

/// A lock-free token bucket: requests deposit, retries withdraw.
#[derive(Debug)]
pub struct RetryBudget {
    /// Current balance in milli-tokens.
    balance: AtomicI64,
    /// Deposit per request (`ratio * COST`).
    deposit: i64,
    /// Most the balance can hold, so a long quiet period cannot bank an unbounded burst.
    cap: i64,
}

impl RetryBudget {
    /// A budget allowing retries of about `ratio` (0.0..=1.0) of requests.
    pub fn new(ratio: f64) -> RetryBudget {
        let deposit = (ratio.clamp(0.0, 1.0) * COST as f64).round() as i64;
        let cap = if deposit == 0 {
            0
        } else {
            RESERVE_RETRIES * COST
        };
        RetryBudget {
            balance: AtomicI64::new(cap),
            deposit,
            cap,
        }
    }

    /// Records one request (called once per client request, before any retry).
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        // Cheap check first: a full bucket (the usual case) costs one load, not a CAS.
        if self.balance.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.deposit).min(self.cap))
            });
    }

    /// Whether a retry would be allowed now (without taking it).
    pub fn available(&self) -> bool {
        self.balance.load(Ordering::Relaxed) >= COST
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= COST).then_some(b - COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_ratio() {
        let budget = RetryBudget::new(0.2);
        // The reserve is spent first.
        for _ in 0..RESERVE_RETRIES {
            assert!(budget.try_withdraw());
        }
        assert!(!budget.try_withdraw());
        assert!(!budget.available());
        // Then 1000 requests buy 200 retries, not more.
        let mut allowed = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 200);
    }

    #[test]
    fn the_balance_is_capped() {
        let budget = RetryBudget::new(0.5);
        for _ in 0..10_000 {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.try_withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, RESERVE_RETRIES);
    }

    #[test]
    fn zero_ratio_disables_retries() {
        let budget = RetryBudget::new(0.0);
        budget.deposit();
        assert!(!budget.try_withdraw());
    }
}
