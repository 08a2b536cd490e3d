//! The stage's one shutdown signal: fired once (SIGTERM, SIGINT, or a fatal
//! error), seen by every task that must stop or drain: the ring's listener,
//! the MQTT loop, the reply publisher and the serving loop. The pipeline thread
//! is told by an event instead ([`crate::pipeline::Event::Drain`]), since it
//! waits on its own channel.

use std::sync::Arc;
use tokio::sync::watch;

/// Fires the shutdown; every [`Shutdown`] made from it sees it.
#[derive(Debug, Clone)]
pub struct Trigger(Arc<watch::Sender<bool>>);

/// A task's view of the shutdown: cheap to clone, checked or awaited.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new, unfired shutdown signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(Arc::new(tx)), Shutdown(rx))
}

impl Trigger {
    /// Fires the shutdown (again is harmless).
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Another view of this shutdown.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the shutdown has fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown has fired (at once if it already has, and
    /// also if the trigger is gone: no one is left to keep the stage up).
    pub async fn fired(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_view_sees_the_shutdown_once_fired() {
        let (trigger, mut a) = channel();
        let mut b = trigger.subscribe();
        assert!(!a.is_fired());
        trigger.fire();
        a.fired().await;
        b.fired().await;
        assert!(a.is_fired() && b.is_fired());
        let mut orphan = {
            let (t, s) = channel();
            drop(t);
            s
        };
        orphan.fired().await;
    }
}
