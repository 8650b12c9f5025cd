//! Leadership among heads that share an etcd store (`--store etcd://...`).
//!
//! One head holds the leadership key `PREFIX/leader`, attached to an etcd lease of
//! `--leader-lease`; it renews the lease a few times per lease and acts. The others are standbys:
//! they answer with the leader's address and take the key when its lease expires.
//!
//! - [`LeaseClock`] (synchronous, unit-tested on made-up instants) says until when this head may
//!   act: the send time of the last renewal etcd acknowledged plus the TTL etcd gave, less a safety
//!   margin. etcd counts the lease from when the renewal *arrived*, later than it was sent, so the
//!   head always stops believing it leads before etcd lets another head lead. A head frozen
//!   (SIGSTOP) past that point finds, on waking, that its time is up before it does anything.
//! - [`Fence`] carries that deadline and the leadership's **epoch** (the create revision of the
//!   leadership key, which only grows) to the parts that act: every store write is an etcd
//!   transaction that checks the key still has that create revision, and commands to workers are
//!   only sent while [`Fence::holds`].
//! - [`campaign`] and [`hold`] are the thin async shell.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{Etcd, EtcdError, ops};

/// How much of the lease is kept back: the head stops acting this long before etcd could let
/// another head lead (covers clock-rate differences and the time a write takes to land).
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(100))
}

/// How often the lease is renewed: three times per lease.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Until when the leader may act.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    ttl: Duration,
    valid_until: Instant,
}

impl LeaseClock {
    /// Leadership won by a write sent at `sent_at` under a lease of `ttl`.
    pub fn won(sent_at: Instant, ttl: Duration) -> LeaseClock {
        LeaseClock { ttl, valid_until: sent_at + ttl.saturating_sub(safety_margin(ttl)) }
    }

    /// etcd acknowledged a renewal sent at `sent_at`, giving the lease `ttl_s` seconds; `Err`
    /// when etcd says the lease is gone.
    pub fn renewed(&mut self, sent_at: Instant, ttl_s: i64) -> Result<(), String> {
        if ttl_s <= 0 {
            return Err("etcd says the leadership lease expired".into());
        }
        let ttl = Duration::from_secs(ttl_s as u64).min(self.ttl);
        let until = sent_at + ttl.saturating_sub(safety_margin(self.ttl));
        // An answer to an older renewal never moves the deadline back.
        self.valid_until = self.valid_until.max(until);
        Ok(())
    }

    /// Whether this head may still act at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }
}

/// What the acting parts of a leading head check. A head on the embedded store always holds it.
#[derive(Debug, Default)]
pub struct Fence {
    /// The leadership key's create revision; 0 where there is no election (redb).
    epoch: AtomicI64,
    clock: Mutex<Option<LeaseClock>>,
    lost: CancellationToken,
    why: Mutex<Option<String>>,
}

impl Fence {
    /// The fence of a head that needs no election (the embedded store): it always holds.
    pub fn always() -> Fence {
        Fence::default()
    }

    pub fn leading(epoch: i64, clock: LeaseClock) -> Fence {
        Fence { epoch: AtomicI64::new(epoch), clock: Mutex::new(Some(clock)), ..Default::default() }
    }

    /// Whether this head may act now: it has not lost leadership and its lease has time left.
    pub fn holds(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        match &*self.clock.lock().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(c) if c.holds(Instant::now()) => true,
            Some(_) => {
                self.lose(
                    "the leadership lease ran out before etcd renewed it (this head was frozen, or cut off from etcd)",
                );
                false
            }
        }
    }

    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Records a renewal; `false` (and leadership lost) when etcd said the lease is gone.
    pub fn renewed(&self, sent_at: Instant, ttl_s: i64) -> bool {
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(clock) = c.as_mut() {
            // A renewal that comes back after the deadline passed does not revive leadership:
            // another head may have led meanwhile.
            if !clock.holds(Instant::now()) {
                drop(c);
                self.lose("the leadership lease ran out before etcd renewed it");
                return false;
            }
            if let Err(why) = clock.renewed(sent_at, ttl_s) {
                drop(c);
                self.lose(&why);
                return false;
            }
        }
        true
    }

    /// When the lease runs out, if it is an elected leadership.
    pub fn valid_until(&self) -> Option<Instant> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(LeaseClock::valid_until)
    }

    /// Leadership is lost for good (the first reason is kept).
    pub fn lose(&self, why: &str) {
        let mut w = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_none() {
            *w = Some(why.to_string());
        }
        drop(w);
        self.lost.cancel();
    }

    /// Cancelled when leadership is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn why(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The leadership key under a prefix.
pub fn leader_key(prefix: &str) -> Vec<u8> {
    format!("{prefix}leader").into_bytes()
}

/// Who leads now, as a standby sees it (shared with the standby server).
pub type LeaderView = tokio::sync::watch::Sender<Option<String>>;

/// Campaigns until this head leads (or `stop`): grants a lease, tries to create the leadership
/// key; while another head holds it, watches it (polling a few times per lease) and publishes the
/// leader's address on `view`. Returns the leadership's lease id and fence.
pub async fn campaign(
    etcd: &Etcd,
    me: &str,
    ttl: Duration,
    view: &LeaderView,
    stop: &CancellationToken,
) -> Option<(i64, std::sync::Arc<Fence>)> {
    let key = leader_key(&etcd.config().prefix);
    let poll = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let mut lease: Option<i64> = None;
    // When the last grant or renewal of `lease` that etcd acknowledged was sent: the lease lives at
    // least until then plus its TTL (attaching a key to it does not renew it).
    let mut renewed_at = Instant::now();
    let mut last_error: Option<String> = None;
    loop {
        if stop.is_cancelled() {
            if let Some(id) = lease {
                let _ = etcd.revoke(id).await;
            }
            return None;
        }
        let attempt: Result<Option<(i64, std::sync::Arc<Fence>)>, EtcdError> = async {
            let id = match lease {
                Some(id) => id,
                None => {
                    let sent = Instant::now();
                    let id = etcd.grant(ttl).await?;
                    lease = Some(id);
                    renewed_at = sent;
                    id
                }
            };
            let r = etcd
                .txn(tessera_proto::etcd::etcdserverpb::TxnRequest {
                    compare: vec![ops::created_at(key.clone(), 0)],
                    success: vec![ops::put(key.clone(), me.as_bytes().to_vec(), id)],
                    failure: vec![ops::get(key.clone())],
                })
                .await?;
            if r.succeeded {
                let epoch = r.header.as_ref().map(|h| h.revision).unwrap_or_default();
                return Ok(Some((id, std::sync::Arc::new(Fence::leading(epoch, LeaseClock::won(renewed_at, ttl))))));
            }
            // Our own key: an earlier try succeeded but its answer was lost (the call was sent
            // again to another member).
            if let Some(kv) = ops::first_kv(&r)
                && kv.lease == id
            {
                let won = LeaseClock::won(renewed_at, ttl);
                return Ok(Some((id, std::sync::Arc::new(Fence::leading(kv.create_revision, won)))));
            }
            let leader = ops::first_kv(&r).map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            view.send_if_modified(|v| {
                let changed = *v != leader;
                *v = leader.clone();
                changed
            });
            // Our own lease stays alive while we wait (it is used the moment the key is free).
            let sent = Instant::now();
            if etcd.keep_alive(id).await? <= 0 {
                lease = None;
            } else {
                renewed_at = sent;
            }
            Ok(None)
        }
        .await;
        match attempt {
            Ok(Some(won)) => return Some(won),
            Ok(None) => last_error = None,
            Err(e) => {
                // The lease may have run out meanwhile: a fresh one next time.
                lease = None;
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    warn!(error = %msg, "standby: cannot reach etcd; retrying");
                }
                last_error = Some(msg);
                view.send_if_modified(|v| v.take().is_some());
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Keeps the leadership lease renewed until `stop` (then revokes it, handing leadership over at
/// once) or until it is lost (the fence says why).
pub async fn hold(etcd: Etcd, lease: i64, fence: std::sync::Arc<Fence>, ttl: Duration, stop: CancellationToken) {
    let every = renew_every(ttl);
    let lost = fence.lost();
    // The first renewal at once: the lease's time counts from before the election was won.
    let mut first = true;
    loop {
        let deadline = fence.valid_until().unwrap_or_else(|| Instant::now() + ttl);
        tokio::select! {
            _ = stop.cancelled() => {
                match etcd.revoke(lease).await {
                    Ok(()) => info!("leadership handed over (lease revoked)"),
                    Err(e) => warn!(error = %e, "cannot revoke the leadership lease; a standby takes over when it expires"),
                }
                return;
            }
            _ = lost.cancelled() => {
                // Only this lease's keys go: safe, and a head started again at once need not
                // wait for it to run out.
                let _ = tokio::time::timeout(Duration::from_secs(1), etcd.revoke(lease)).await;
                return;
            }
            // The deadline passing is loss even if no renewal answer ever comes.
            _ = tokio::time::sleep_until(deadline) => {
                let _ = fence.holds();
                continue;
            }
            _ = tokio::time::sleep(if first { Duration::ZERO } else { every }) => {}
        }
        first = false;
        let sent_at = Instant::now();
        let renewal = tokio::time::timeout_at(deadline, etcd.keep_alive(lease)).await;
        match renewal {
            Ok(Ok(ttl_s)) => {
                fence.renewed(sent_at, ttl_s);
            }
            Ok(Err(e)) => warn!(error = %e, "cannot renew the leadership lease; retrying until it runs out"),
            Err(_) => {
                let _ = fence.holds();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_ends_before_etcd_could_give_it_to_another_head() {
        let ttl = Duration::from_secs(3);
        let t0 = Instant::now();
        let mut c = LeaseClock::won(t0, ttl);
        // Valid until 3 s less the margin (0.5 s) after the winning write was sent.
        assert!(c.holds(t0 + Duration::from_millis(2400)));
        assert!(!c.holds(t0 + Duration::from_millis(2500)));
        // A renewal sent at 1 s and answered: counted from when it was sent, not answered.
        c.renewed(t0 + Duration::from_secs(1), 3).expect("renewed");
        assert!(c.holds(t0 + Duration::from_millis(3400)));
        assert!(!c.holds(t0 + Duration::from_millis(3500)));
        // An older renewal answered late never moves the deadline back.
        c.renewed(t0 + Duration::from_millis(500), 3).expect("renewed");
        assert!(c.holds(t0 + Duration::from_millis(3400)));
        // etcd says the lease is gone.
        assert!(c.renewed(t0 + Duration::from_secs(2), 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_leader_finds_its_time_up_on_waking_and_a_late_renewal_does_not_revive_it() {
        let ttl = Duration::from_secs(3);
        let fence = Fence::leading(42, LeaseClock::won(Instant::now(), ttl));
        assert!(fence.holds());
        assert_eq!(fence.epoch(), 42);
        let sent = Instant::now();
        // Frozen for 10 s (SIGSTOP): the monotonic clock went on.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!fence.holds(), "the lease ran out while frozen");
        assert!(fence.lost().is_cancelled());
        assert!(fence.why().expect("why").contains("ran out"), "{:?}", fence.why());
        // The renewal that was in flight comes back now: too late.
        assert!(!fence.renewed(sent, 3));
        assert!(!fence.holds());
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_keep_leadership_and_etcd_saying_gone_ends_it() {
        let ttl = Duration::from_secs(3);
        let fence = Fence::leading(7, LeaseClock::won(Instant::now(), ttl));
        for _ in 0..10 {
            tokio::time::advance(renew_every(ttl)).await;
            assert!(fence.renewed(Instant::now(), 3));
            assert!(fence.holds());
        }
        assert!(!fence.renewed(Instant::now(), -1));
        assert!(!fence.holds());
        assert_eq!(fence.why().as_deref(), Some("etcd says the leadership lease expired"));
        // The embedded store's fence always holds.
        assert!(Fence::always().holds());
    }
}
