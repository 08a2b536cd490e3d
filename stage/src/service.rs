//! The stage as a systemd service (`Type=notify`): it says when it is ready,
//! what it is doing, and that it is alive. Outside systemd (no `NOTIFY_SOCKET`)
//! every call does nothing.
//!
//! Alive means the pipeline thread still reports: the watchdog is fed only
//! while its telemetry keeps arriving, so a pipeline stuck in a kernel or a
//! deadlock gets the unit restarted, not just a process whose runtime spins.

use sd_notify::NotifyState;
use std::time::{Duration, Instant};

/// What systemd asked for and what the stage last told it.
#[derive(Debug)]
pub struct Service {
    /// `WatchdogSec` from the unit, when set.
    watchdog: Option<Duration>,
    /// When the pipeline last showed it was alive.
    last_sign: Instant,
    ready: bool,
}

impl Service {
    /// Reads the watchdog settings systemd passed. They stay in the
    /// environment: removing variables while other threads run is a data race
    /// in libc, and the stage starts no processes that could inherit them.
    pub fn from_env() -> Self {
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Self {
            watchdog,
            last_sign: Instant::now(),
            ready: false,
        }
    }

    /// How often to call [`Service::tick`]: half the watchdog period, as
    /// systemd advises; once a second without a watchdog.
    pub fn tick_every(&self) -> Duration {
        self.watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 2).max(Duration::from_millis(10))
        })
    }

    /// A line for `systemctl status`.
    pub fn status(&self, text: &str) {
        send(&[NotifyState::Status(text)]);
    }

    /// The stage can do its part: weights loaded, the pipeline running.
    pub fn ready(&mut self, text: &str) {
        self.ready = true;
        self.last_sign = Instant::now();
        send(&[NotifyState::Ready, NotifyState::Status(text)]);
    }

    /// The pipeline reported (telemetry): it is alive.
    pub fn pipeline_alive(&mut self) {
        self.last_sign = Instant::now();
    }

    /// Feeds the watchdog if the stage is alive: before readiness the control
    /// loop calling this is proof enough (loading reports its own progress);
    /// after it, the pipeline must have reported within the watchdog period.
    pub fn tick(&self) {
        let Some(period) = self.watchdog else {
            return;
        };
        if !self.ready || self.last_sign.elapsed() < period {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(
                silent_s = self.last_sign.elapsed().as_secs_f64(),
                "the pipeline has not reported within the watchdog period; not feeding it"
            );
        }
    }

    /// Feeds the watchdog until aborted: while the stage waits for its plan
    /// and loads its weights, a live runtime is all there is to show.
    pub fn keep_alive_while_starting(&self) -> impl std::future::Future<Output = ()> + 'static {
        let (watchdog, every) = (self.watchdog, self.tick_every());
        async move {
            if watchdog.is_none() {
                return;
            }
            loop {
                send(&[NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        }
    }

    /// Tells systemd the stage has begun to drain, so that `systemctl status`
    /// shows it stopping.
    pub fn stopping(&self) {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
