//! Requests between the MQTT loop and the intake. The MQTT loop must never wait
//! on tokenization: while it does not read, rumqttd keeps the requests it has
//! not delivered in a bounded log, and a burst of large prompts overruns that
//! log and is lost with nothing said to anyone. So the loop only copies each
//! request into this queue, bounded in bytes, and one intake thread checks and
//! tokenizes them in order. A request that finds the queue full is refused with
//! `overloaded` at once, on the loop itself: a cheap look at its id and reply
//! topic, never silence.

use crate::control::RequestSink;
use crate::pipeline::Event;
use crate::starter::intake::{Refusal, Sender};
use crate::starter::Outgoing;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// One request as it came off MQTT.
struct Arrival {
    payload: bytes::Bytes,
    /// The robot's login, for requests lime-broker forwarded for one.
    robot: Option<String>,
    response_topic: Option<String>,
    correlation: Option<Vec<u8>>,
    received: Instant,
    /// A cancel (`lime/cancel`), kept in line with the requests so that a
    /// cancel never overtakes the request it names.
    cancel: bool,
}

impl Arrival {
    fn new(payload: bytes::Bytes, sender: Sender<'_>, received: Instant, cancel: bool) -> Self {
        Self {
            payload,
            robot: match sender {
                Sender::Robot(user) => Some(user.to_owned()),
                Sender::Trusted => None,
            },
            response_topic: None,
            correlation: None,
            received,
            cancel,
        }
    }

    fn sender(&self) -> Sender<'_> {
        match &self.robot {
            Some(user) => Sender::Robot(user),
            None => Sender::Trusted,
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Arrival>,
    bytes: usize,
}

impl Queue {
    fn push(&mut self, a: Arrival) {
        self.bytes += a.payload.len();
        self.items.push_back(a);
    }
}

/// The MQTT loop's end of the queue.
#[derive(Clone)]
pub struct Inflow {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    sink: Arc<RequestSink>,
    max_bytes: usize,
}

impl Inflow {
    /// Starts the intake thread; `max_bytes` bounds the payloads waiting for it.
    pub fn start(sink: RequestSink, max_bytes: usize) -> std::io::Result<Self> {
        let inflow = Self {
            shared: Arc::default(),
            sink: Arc::new(sink),
            max_bytes,
        };
        let worker = inflow.clone();
        std::thread::Builder::new()
            .name("lime-intake".into())
            .spawn(move || worker.serve())?;
        Ok(inflow)
    }

    /// Takes one request off the MQTT loop without waiting on the intake.
    pub fn offer(
        &self,
        payload: bytes::Bytes,
        sender: Sender<'_>,
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        received: Instant,
    ) {
        let (lock, wake) = &*self.shared;
        let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
        // One request alone always fits, whatever its size: the intake refuses an
        // oversized one with its own clear error.
        if !queue.items.is_empty() && queue.bytes + payload.len() > self.max_bytes {
            let (waiting, bytes) = (queue.items.len(), queue.bytes);
            drop(queue);
            let why = format!(
                "{waiting} requests ({bytes} bytes) are waiting to be read; try again shortly"
            );
            let refusal =
                self.sink
                    .intake
                    .overloaded(&payload, sender, response_topic, correlation, &why);
            tracing::warn!(waiting, bytes, "request refused: the intake queue is full");
            refuse(&self.sink, sender, *refusal);
            return;
        }
        let arrival = Arrival::new(payload, sender, received, false);
        queue.push(Arrival {
            response_topic: response_topic.map(str::to_owned),
            correlation: correlation.map(<[u8]>::to_vec),
            ..arrival
        });
        wake.notify_one();
    }

    /// Takes a cancel off the MQTT loop; it waits behind the requests already
    /// queued, whatever room is left.
    pub fn offer_cancel(&self, payload: bytes::Bytes, sender: Sender<'_>) {
        let (lock, wake) = &*self.shared;
        let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
        queue.push(Arrival::new(payload, sender, Instant::now(), true));
        wake.notify_one();
    }

    fn serve(self) {
        loop {
            let arrival = {
                let (lock, wake) = &*self.shared;
                let mut queue = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(a) = queue.items.pop_front() {
                        queue.bytes -= a.payload.len();
                        break a;
                    }
                    queue = wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            };
            if !self.take(&arrival) {
                return;
            }
        }
    }

    /// Checks and tokenizes one request; false once the pipeline is gone.
    fn take(&self, a: &Arrival) -> bool {
        let sender = a.sender();
        if a.cancel {
            return match self.sink.intake.cancel(&a.payload, sender) {
                Ok(key) => self.sink.events.send(Event::Cancel(key)).is_ok(),
                Err(refusal) => {
                    refuse(&self.sink, sender, *refusal);
                    true
                }
            };
        }
        let checked = self.sink.intake.accept(
            &a.payload,
            sender,
            a.response_topic.as_deref(),
            a.correlation.as_deref(),
            a.received,
        );
        match checked {
            Ok(Some(job)) => {
                tracing::debug!(id = %job.id, ?sender, prompt = job.prompt.len(), "request accepted");
                self.sink.events.send(Event::Job(Box::new(job))).is_ok()
            }
            Ok(None) => {
                tracing::info!("a request taken lately arrived again; served once");
                true
            }
            Err(refusal) => {
                refuse(&self.sink, sender, *refusal);
                true
            }
        }
    }
}

fn refuse(sink: &RequestSink, sender: Sender<'_>, refusal: Refusal) {
    tracing::warn!(
        id = ?refusal.error.id,
        ?sender,
        code = ?refusal.error.error.code,
        message = %refusal.error.error.message,
        topic = %refusal.reply.topic,
        "request refused"
    );
    let payload = serde_json::to_vec(&refusal.error).unwrap_or_default();
    let _ = sink.outbox.send(Outgoing {
        reply: refusal.reply,
        payload,
    });
}
