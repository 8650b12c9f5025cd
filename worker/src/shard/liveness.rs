//! Is a vLLM engine alive, not just its process? A synchronous state machine (inputs + now ->
//! effects) that the shard host drives for node rank 0's `vllm serve`; see [`Liveness::step`].
//!
//! - **Start-up deadline**: not ready within `startup_timeout` -> unhealthy (every engine).
//! - **Health**: once ready, `GET /health` on the address vLLM binds, every check interval;
//!   [`HEALTH_FAILURES`] failures in a row -> unhealthy.
//! - **Progress watchdog**: vLLM's `/metrics` says requests are running or waiting while its
//!   token counters (prompt + generated) have not moved for `stall_timeout` -> unhealthy. A hung
//!   rank on any node stops every token of the group, while node 0's `/health` stays 200.
//! - **Idle canary**: when no token was produced for `canary_interval`, a 1-token completion; it
//!   must answer within `stall_timeout`, else (or on an error answer) -> unhealthy.
//!
//! The verdict is given once, with the check and the numbers; the head restarts the group.

use std::time::Duration;

use tokio::time::Instant;

/// Failed `/health` checks in a row that make an engine unhealthy.
pub const HEALTH_FAILURES: u32 = 3;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub startup_timeout: Option<Duration>,
    /// Checks after ready; `None`: only the start-up deadline.
    pub checks: Option<Checks>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checks {
    pub interval: Duration,
    pub stall_timeout: Duration,
    pub canary_interval: Option<Duration>,
}

/// What `/metrics` (and `/load`) say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// vLLM's scheduler stats. They freeze with the engine: a hang that starts while idle keeps
    /// showing 0 running and 0 waiting whatever arrives next (seen with vLLM 0.32).
    pub running: f64,
    pub waiting: f64,
    /// Prompt + generated tokens so far.
    pub tokens: f64,
    /// Requests the API server holds (`/load` with `--enable-server-load-tracking`), counted
    /// on arrival, whatever the engine does; 0 when unknown.
    pub in_flight: f64,
}

impl Sample {
    /// Requests waiting for tokens, by the best count there is.
    fn busy(&self) -> f64 {
        (self.running + self.waiting).max(self.in_flight)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The engine answered its health check for the first time.
    Ready,
    /// A `/health` check: `Err` says what went wrong.
    Health(Result<(), String>),
    /// A `/metrics` scrape; `None` when the engine has no metrics (the watchdog then rests).
    Metrics(Option<Sample>),
    /// The canary's answer: `Err` for no answer or a server error.
    Canary(Result<(), String>),
    /// The canary was refused for a reason that says nothing about the engine (an API key it
    /// lacks, a model without completions): canaries stop, with why.
    CanaryUnusable(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a canary; it must answer within this long.
    SendCanary(Duration),
    CheckHealth,
    ScrapeMetrics,
    Unhealthy(String),
}

/// How long a canary sent to confirm a stall may take: a live engine schedules a 1-token request
/// within a few steps even when busy. The suspicion comes this much before the stall timeout (half
/// of a shorter one), so that the verdict comes at the stall timeout.
pub const CONFIRM: Duration = Duration::from_secs(5);

fn confirm_window(stall: Duration) -> Duration {
    CONFIRM.min(stall / 2)
}

/// A canary in flight.
#[derive(Debug, Clone)]
struct Canary {
    sent: Instant,
    limit: Duration,
    /// The watchdog's suspicion it was sent to confirm: what the metrics said, and since when no
    /// token was produced.
    suspicion: Option<(Sample, Instant)>,
}

#[derive(Debug)]
pub struct Liveness {
    cfg: Config,
    started: Instant,
    ready: bool,
    next_check: Option<Instant>,
    health_failures: u32,
    last_health_error: String,
    /// The token count last seen and when it last moved (or the engine was idle).
    tokens: Option<f64>,
    progress_at: Instant,
    /// When a token was last produced (or a canary answered): the canary's clock.
    active_at: Instant,
    canary: Option<Canary>,
    /// Why canaries cannot be used, once found out.
    canary_unusable: Option<String>,
    verdict: bool,
}

/// A configured duration ("30s", "10m").
fn secs(d: Duration) -> String {
    tessera_common::duration::format_duration(d)
}

/// A measured duration, to a tenth of a second ("30.0 s").
fn measured(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl Liveness {
    pub fn new(cfg: Config, now: Instant) -> Self {
        Liveness {
            cfg,
            started: now,
            ready: false,
            next_check: None,
            health_failures: 0,
            last_health_error: String::new(),
            tokens: None,
            progress_at: now,
            active_at: now,
            canary: None,
            canary_unusable: None,
            verdict: false,
        }
    }

    /// When [`Self::step`] next has something to do without an input.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.verdict {
            return None;
        }
        if !self.ready {
            return self.cfg.startup_timeout.map(|t| self.started + t);
        }
        self.cfg.checks.as_ref()?;
        let canary_due = self.canary.as_ref().map(|c| c.sent + c.limit);
        [self.next_check, canary_due].into_iter().flatten().min()
    }

    pub fn step(&mut self, input: Option<Input>, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.verdict {
            return out;
        }
        match input {
            Some(Input::Ready) if !self.ready => {
                self.ready = true;
                self.progress_at = now;
                self.active_at = now;
                self.next_check = self.cfg.checks.as_ref().map(|c| now + c.interval);
            }
            Some(Input::Health(r)) => match r {
                Ok(()) => self.health_failures = 0,
                Err(why) => {
                    self.health_failures += 1;
                    self.last_health_error = why;
                }
            },
            // The sample's side effect (tokens and progress) happens in the guard.
            Some(Input::Metrics(Some(s))) if self.suspicious(s, now) => {
                // A stuck client holds requests too: a canary confirms before any verdict.
                let stall = self.cfg.checks.as_ref().map(|c| c.stall_timeout).unwrap_or_default();
                let window = confirm_window(stall);
                let since = self.progress_at;
                match (&mut self.canary, &self.canary_unusable) {
                    (Some(c), _) => {
                        c.limit = c.limit.min(now.saturating_duration_since(c.sent) + window);
                        c.suspicion = Some((s, since));
                    }
                    (None, None) => {
                        self.canary = Some(Canary { sent: now, limit: window, suspicion: Some((s, since)) });
                        out.push(Effect::SendCanary(window));
                    }
                    (None, Some(why)) => {
                        if now.saturating_duration_since(since) >= stall {
                            let why = format!("{} (no canary to confirm it: {why})", self.stall_message(s, since, now));
                            return self.unhealthy(why);
                        }
                    }
                }
            }
            Some(Input::Metrics(None)) => {
                // No metrics: the watchdog cannot see progress; the canary still can.
                self.progress_at = now;
            }
            Some(Input::Canary(r)) => {
                if let Some(c) = self.canary.take() {
                    match r {
                        Ok(()) => {
                            // The engine is alive: what the watchdog saw was a client, not a hang.
                            self.active_at = now;
                            self.progress_at = now;
                        }
                        Err(why) => {
                            let took = measured(now.saturating_duration_since(c.sent));
                            return self.unhealthy(match c.suspicion {
                                Some((s, since)) => format!(
                                    "{}; a 1-token canary sent to confirm failed after {took}: {why}",
                                    self.stall_message(s, since, now)
                                ),
                                None => format!(
                                    "the canary request (a 1-token completion, sent when idle) failed after {took}: {why}"
                                ),
                            });
                        }
                    }
                }
            }
            Some(Input::CanaryUnusable(why)) => {
                let suspicion = self.canary.take().and_then(|c| c.suspicion);
                if let Some((s, since)) = suspicion {
                    let msg = self.stall_message(s, since, now);
                    return self.unhealthy(format!("{msg} (the canary to confirm it was refused: {why})"));
                }
                self.canary_unusable = Some(why);
            }
            _ => {}
        }
        if !self.ready {
            if let Some(t) = self.cfg.startup_timeout
                && now.saturating_duration_since(self.started) >= t
            {
                return self.unhealthy(format!("not ready after {} (--startup-timeout)", secs(t)));
            }
            return out;
        }
        let Some(c) = self.cfg.checks.clone() else { return out };
        if self.health_failures >= HEALTH_FAILURES {
            return self.unhealthy(format!(
                "/health failed {} times in a row: {}",
                self.health_failures, self.last_health_error
            ));
        }
        if let Some(k) = self.canary.clone()
            && now.saturating_duration_since(k.sent) >= k.limit
        {
            let why = match k.suspicion {
                Some((s, since)) => format!(
                    "{}, and a 1-token canary sent to confirm did not answer within {}",
                    self.stall_message(s, since, now),
                    measured(k.limit)
                ),
                None => format!(
                    "the canary request (a 1-token completion, sent when idle) did not finish within {} (--stall-timeout)",
                    secs(k.limit)
                ),
            };
            return self.unhealthy(why);
        }
        if self.next_check.is_some_and(|t| now >= t) {
            self.next_check = Some(now + c.interval);
            if let Some(every) = c.canary_interval
                && self.canary.is_none()
                && self.canary_unusable.is_none()
                && now.saturating_duration_since(self.active_at) >= every
            {
                self.canary = Some(Canary { sent: now, limit: c.stall_timeout, suspicion: None });
                out.push(Effect::SendCanary(c.stall_timeout));
            }
            out.push(Effect::CheckHealth);
            out.push(Effect::ScrapeMetrics);
        }
        out
    }

    /// A metrics sample: true when the engine looks stuck (requests held, no token) for long
    /// enough to send a confirming canary.
    fn suspicious(&mut self, s: Sample, now: Instant) -> bool {
        let moved = self.tokens.is_none_or(|t| s.tokens != t);
        self.tokens = Some(s.tokens);
        if moved {
            self.active_at = now;
        }
        if moved || s.busy() == 0.0 {
            self.progress_at = now;
            return false;
        }
        let Some(c) = self.cfg.checks.as_ref() else { return false };
        let suspect_after = c.stall_timeout.saturating_sub(confirm_window(c.stall_timeout));
        now.saturating_duration_since(self.progress_at) >= suspect_after
    }

    fn stall_message(&self, s: Sample, since: Instant, now: Instant) -> String {
        let stall = self.cfg.checks.as_ref().map(|c| c.stall_timeout).unwrap_or_default();
        format!(
            "no progress: {} request(s) in flight ({} running and {} waiting by vLLM's stats), but no token produced for {} (tokens stuck at {}; --stall-timeout {})",
            s.busy(),
            s.running,
            s.waiting,
            measured(now.saturating_duration_since(since)),
            s.tokens,
            secs(stall)
        )
    }

    fn unhealthy(&mut self, why: String) -> Vec<Effect> {
        self.verdict = true;
        vec![Effect::Unhealthy(why)]
    }
}

/// Reads what the watchdog needs from vLLM's Prometheus text: `vllm:num_requests_running`,
/// `vllm:num_requests_waiting`, `vllm:prompt_tokens_total` and `vllm:generation_tokens_total`
/// (summed over their label sets). `None` when none of them is there.
pub fn parse_metrics(text: &str) -> Option<Sample> {
    let mut s = Sample { running: 0.0, waiting: 0.0, tokens: 0.0, in_flight: 0.0 };
    let mut seen = false;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let slot = match name {
            "vllm:num_requests_running" => &mut s.running,
            "vllm:num_requests_waiting" => &mut s.waiting,
            "vllm:prompt_tokens_total" | "vllm:generation_tokens_total" => &mut s.tokens,
            _ => continue,
        };
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite()) {
            *slot += v;
            seen = true;
        }
    }
    seen.then_some(s)
}

/// `/load`'s `{"server_load": N}`.
pub fn parse_load(text: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(text).ok()?.get("server_load")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn machine(canary: Option<Duration>) -> (Liveness, Instant) {
        let t0 = Instant::now();
        let cfg = Config {
            startup_timeout: Some(600 * S),
            checks: Some(Checks { interval: S, stall_timeout: 30 * S, canary_interval: canary }),
        };
        (Liveness::new(cfg, t0), t0)
    }

    fn busy(tokens: f64) -> Input {
        Input::Metrics(Some(Sample { running: 1.0, waiting: 2.0, tokens, in_flight: 0.0 }))
    }

    fn unhealthy(out: &[Effect]) -> Option<&str> {
        out.iter().find_map(|e| match e {
            Effect::Unhealthy(why) => Some(why.as_str()),
            _ => None,
        })
    }

    #[test]
    fn a_start_past_its_deadline_is_unhealthy_once() {
        let (mut m, t0) = machine(None);
        assert_eq!(m.next_deadline(), Some(t0 + 600 * S));
        assert!(m.step(None, t0 + 599 * S).is_empty());
        let out = m.step(None, t0 + 600 * S);
        assert_eq!(unhealthy(&out), Some("not ready after 10m (--startup-timeout)"));
        assert!(m.step(None, t0 + 700 * S).is_empty() && m.next_deadline().is_none(), "said once");
    }

    #[test]
    fn once_ready_health_and_metrics_are_checked_every_interval() {
        let (mut m, t0) = machine(None);
        assert!(m.step(Some(Input::Ready), t0).is_empty());
        assert_eq!(m.next_deadline(), Some(t0 + S));
        assert_eq!(m.step(None, t0 + S), vec![Effect::CheckHealth, Effect::ScrapeMetrics]);
        assert!(m.step(None, t0 + S + S / 2).is_empty());
        // The start-up deadline no longer applies.
        assert!(unhealthy(&m.step(None, t0 + 601 * S)).is_none());
    }

    fn sends_canary(out: &[Effect]) -> Option<Duration> {
        out.iter().find_map(|e| match e {
            Effect::SendCanary(limit) => Some(*limit),
            _ => None,
        })
    }

    #[test]
    fn requests_waiting_while_tokens_stand_still_is_a_hang_once_a_canary_confirms_it() {
        let (mut m, t0) = machine(None);
        m.step(Some(Input::Ready), t0);
        m.step(Some(busy(100.0)), t0 + S);
        // Moving tokens are progress.
        m.step(Some(busy(150.0)), t0 + 10 * S);
        let out = m.step(Some(busy(150.0)), t0 + 34 * S);
        assert!(unhealthy(&out).is_none() && sends_canary(&out).is_none());
        // 25 s stuck: a suspicion, confirmed by a canary with 5 s to answer, so that the verdict
        // comes at the stall timeout.
        let out = m.step(Some(busy(150.0)), t0 + 35 * S);
        assert_eq!((unhealthy(&out), sends_canary(&out)), (None, Some(CONFIRM)));
        assert!(unhealthy(&m.step(None, t0 + 39 * S)).is_none());
        let out = m.step(None, t0 + 40 * S);
        let why = unhealthy(&out).expect("a hang");
        assert!(why.contains("3 request(s) in flight (1 running and 2 waiting") && why.contains("for 30.0 s"), "{why}");
        assert!(why.contains("tokens stuck at 150") && why.contains("did not answer within 5.0 s"), "{why}");
    }

    #[test]
    fn a_client_that_holds_a_request_while_the_engine_answers_is_not_a_hang() {
        let (mut m, t0) = machine(None);
        m.step(Some(Input::Ready), t0);
        let held = || Input::Metrics(Some(Sample { running: 0.0, waiting: 0.0, tokens: 40.0, in_flight: 1.0 }));
        m.step(Some(held()), t0 + S);
        let out = m.step(Some(held()), t0 + 26 * S);
        assert_eq!(sends_canary(&out), Some(CONFIRM));
        assert!(unhealthy(&m.step(Some(Input::Canary(Ok(()))), t0 + 27 * S)).is_none());
        // The watchdog starts over: another 25 s before the next suspicion.
        assert!(sends_canary(&m.step(Some(held()), t0 + 51 * S)).is_none());
        assert_eq!(sends_canary(&m.step(Some(held()), t0 + 52 * S)), Some(CONFIRM));
    }

    #[test]
    fn requests_the_server_holds_count_when_the_engine_stats_froze_at_idle() {
        let (mut m, t0) = machine(None);
        m.step(Some(Input::Ready), t0);
        let frozen = |in_flight| Input::Metrics(Some(Sample { running: 0.0, waiting: 0.0, tokens: 40.0, in_flight }));
        m.step(Some(frozen(0.0)), t0 + S);
        m.step(Some(frozen(1.0)), t0 + 2 * S);
        assert!(sends_canary(&m.step(Some(frozen(1.0)), t0 + 25 * S)).is_none(), "24 s since the last idle sample");
        assert_eq!(sends_canary(&m.step(Some(frozen(1.0)), t0 + 26 * S)), Some(CONFIRM));
        let out = m.step(Some(Input::Canary(Err("no answer".into()))), t0 + 28 * S);
        let why = unhealthy(&out).expect("hung");
        assert!(why.contains("1 request(s) in flight (0 running and 0 waiting"), "{why}");
        assert!(why.contains("a 1-token canary sent to confirm failed after 2.0 s: no answer"), "{why}");
        assert_eq!(parse_load("{\"server_load\": 3}"), Some(3.0));
        assert_eq!(parse_load("nope"), None);
    }

    #[test]
    fn a_canary_the_engine_refuses_stops_canaries_and_does_not_restart() {
        let (mut m, t0) = machine(Some(S));
        m.step(Some(Input::Ready), t0);
        assert!(sends_canary(&m.step(None, t0 + S)).is_some());
        let out = m.step(Some(Input::CanaryUnusable("POST /v1/completions answered 401".into())), t0 + 2 * S);
        assert!(unhealthy(&out).is_none());
        for i in 3..100 {
            assert!(sends_canary(&m.step(None, t0 + S * i)).is_none(), "no more canaries");
        }
        // A stall can then only be judged by the watchdog, and says so.
        m.step(Some(busy(5.0)), t0 + 100 * S);
        let out = m.step(Some(busy(5.0)), t0 + 130 * S);
        assert!(unhealthy(&out).expect("hung").contains("no canary to confirm it: POST /v1/completions answered 401"));
    }

    #[test]
    fn an_idle_engine_is_not_stalled() {
        let (mut m, t0) = machine(None);
        m.step(Some(Input::Ready), t0);
        for i in 1..100 {
            let out = m.step(
                Some(Input::Metrics(Some(Sample { running: 0.0, waiting: 0.0, tokens: 7.0, in_flight: 0.0 }))),
                t0 + S * i,
            );
            assert!(unhealthy(&out).is_none());
        }
    }

    #[test]
    fn health_fails_three_times_in_a_row_to_count() {
        let (mut m, t0) = machine(None);
        m.step(Some(Input::Ready), t0);
        let down = || Input::Health(Err("connection refused".into()));
        m.step(Some(down()), t0 + S);
        m.step(Some(down()), t0 + 2 * S);
        m.step(Some(Input::Health(Ok(()))), t0 + 3 * S);
        m.step(Some(down()), t0 + 4 * S);
        assert!(unhealthy(&m.step(Some(down()), t0 + 5 * S)).is_none());
        let out = m.step(Some(down()), t0 + 6 * S);
        assert_eq!(unhealthy(&out), Some("/health failed 3 times in a row: connection refused"));
    }

    #[test]
    fn an_idle_engine_gets_a_canary_that_must_answer_within_the_stall_timeout() {
        let (mut m, t0) = machine(Some(30 * S));
        m.step(Some(Input::Ready), t0);
        let mut sent = None;
        for i in 1..=30 {
            let out = m.step(None, t0 + S * i);
            if sends_canary(&out) == Some(30 * S) {
                sent = Some(i);
                break;
            }
        }
        assert_eq!(sent, Some(30), "30 s idle");
        // Answered: the clock starts again.
        m.step(Some(Input::Canary(Ok(()))), t0 + 31 * S);
        assert!(sends_canary(&m.step(None, t0 + 32 * S)).is_none());
        // The next one never answers.
        let mut t = t0 + 32 * S;
        while sends_canary(&m.step(None, t)).is_none() {
            t += S;
        }
        assert_eq!(t, t0 + 61 * S);
        assert_eq!(m.next_deadline(), Some(t + S));
        assert!(unhealthy(&m.step(None, t + 29 * S)).is_none());
        let out = m.step(None, t + 30 * S);
        assert!(unhealthy(&out).expect("hung").contains("did not finish within 30s"));
    }

    #[test]
    fn traffic_is_its_own_canary_and_a_failed_canary_says_why() {
        let (mut m, t0) = machine(Some(30 * S));
        m.step(Some(Input::Ready), t0);
        for i in 1..100u32 {
            let out = m.step(Some(busy(f64::from(i))), t0 + S * i);
            assert!(sends_canary(&out).is_none(), "tokens keep moving: no canary");
            let out = m.step(None, t0 + S * i);
            assert!(sends_canary(&out).is_none());
        }
        let (mut m, t0) = machine(Some(S));
        m.step(Some(Input::Ready), t0);
        assert!(sends_canary(&m.step(None, t0 + S)).is_some());
        let out = m.step(Some(Input::Canary(Err("HTTP 500: engine dead".into()))), t0 + 2 * S);
        assert!(unhealthy(&out).expect("failed").contains("failed after 1.0 s: HTTP 500: engine dead"));
    }

    #[test]
    fn metrics_are_read_from_vllm_prometheus_text() {
        let text = "# HELP vllm:num_requests_running x\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1.0\n\
            vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 40.0\n\
            vllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} 2.0\n\
            vllm:generation_tokens_created{engine=\"0\"} 1.7e9\n";
        assert_eq!(parse_metrics(text), Some(Sample { running: 2.0, waiting: 1.0, tokens: 42.0, in_flight: 0.0 }));
        assert_eq!(parse_metrics("python_gc_objects_collected_total 3\n"), None);
    }
}
