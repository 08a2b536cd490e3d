//! The bandwidth swing: four stages in network namespaces serve a steady bursty
//! load while every link drops from a gigabit to tens of megabits and comes back.
//! It records throughput over time, the plans the broker publishes, and every
//! answer's tokens, for the field test and `lime bench swing` (the adaptive
//! planner against the first plan held fixed).

use crate::cluster::{Cluster, ClusterSpec, MemorySpec, Namespaces, PlannerSpec};
use crate::netns::Fabric;
use lime_client::mqtt::BrokerAddr;
use lime_schemas::{topics, Plan, PlanPrediction, PlanReview, Reply, Request, Telemetry};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The scenario.
#[derive(Debug, Clone)]
pub struct SwingSpec {
    /// A `small` preset checkpoint (or any model the budgets suit).
    pub model: PathBuf,
    pub dir: PathBuf,
    /// Re-plan on measured changes; off, the first plan is held.
    pub adapt: bool,
    pub high_mbit_per_s: f64,
    pub low_mbit_per_s: f64,
    /// Seconds at high, low, then high bandwidth.
    pub phases_s: [f64; 3],
    /// Requests kept in flight.
    pub concurrency: usize,
    pub max_tokens: u32,
    /// Each stage's memory budget and emulated storage bandwidth.
    pub budget_bytes: u64,
    pub read_mb_per_s: f64,
    /// Each stage computes this many times slower than this machine
    /// (`emulate.compute_slowdown`), so that four stages on its cores overlap
    /// like four devices rather than taking turns on two. The standard 8x
    /// leaves the cores room: at 4x the four stages' real computation of a
    /// layer, sharing two cores with the ring, MQTT and the tests' client,
    /// took as long as its emulated time, a third of the visits longer.
    pub compute_slowdown: f64,
}

impl SwingSpec {
    /// The scenario the field test and the benchmark run: budgets that make the
    /// starter (which also holds the ends) stream its layers, fast enough
    /// storage that interleaving hides the reads, emulated devices, and a load
    /// of 16 sequences. Each phase after
    /// a change is long enough that, after the new plan (about 3 s) and the
    /// caches' rebuild (3 to 5 s), 8 s or so are left to measure it by.
    pub fn standard(model: PathBuf, dir: PathBuf, adapt: bool) -> Self {
        Self {
            model,
            dir,
            adapt,
            high_mbit_per_s: 1000.0,
            low_mbit_per_s: 50.0,
            phases_s: [12.0, 16.0, 16.0],
            concurrency: 16,
            max_tokens: 160,
            budget_bytes: 68_000_000 + lime_stage::config::DEFAULT_OVERHEAD_BYTES,
            read_mb_per_s: 1000.0,
            compute_slowdown: 8.0,
        }
    }
}

/// The planner's payback horizon in this scenario (see [`run`]).
const PAYBACK_S: f64 = 120.0;

/// A plan as the robots' side saw it arrive.
#[derive(Debug, Clone)]
pub struct PlanSeen {
    pub at_s: f64,
    pub epoch: u64,
    pub prediction: Option<PlanPrediction>,
    pub starter: String,
    /// When the starter first reported every sequence's cache rebuilt under
    /// this plan: from then on the plan runs at its own pace.
    pub rebuilt_at_s: Option<f64>,
}

/// A verdict of the planner on changed conditions, as the robots' side saw it.
#[derive(Debug, Clone)]
pub struct ReviewSeen {
    pub at_s: f64,
    pub review: PlanReview,
}

/// A stage's report of its link to the next, as the robots' side saw it.
#[derive(Debug, Clone)]
pub struct LinkSeen {
    pub at_s: f64,
    pub from: String,
    pub to: String,
    pub mbit_per_s: f64,
    pub samples: u32,
    /// Age of the newest sample behind the figure.
    pub age_ms: u64,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct SwingRun {
    pub adapt: bool,
    /// Text pieces streamed in each second since the load started.
    pub pieces: Vec<u64>,
    /// Seconds in which some request waited for its first token: its prompt
    /// was being prefilled, which a plan's tokens/s (steady decode) leaves out.
    pub prefilling: Vec<bool>,
    /// Generated tokens per streamed piece, from the final messages.
    pub tokens_per_piece: f64,
    pub plans: Vec<PlanSeen>,
    /// The planner's verdicts on each change it weighed.
    pub reviews: Vec<ReviewSeen>,
    /// When the bandwidth was set, and to what.
    pub shaped: Vec<(f64, f64)>,
    pub completed: usize,
    pub failed: Vec<String>,
    /// Token ids of each completed request, by prompt template.
    pub tokens: BTreeMap<usize, Vec<Vec<u32>>>,
    /// Every link report in the stages' telemetry: what the planner saw.
    pub links: Vec<LinkSeen>,
}

impl SwingRun {
    /// Mean tokens/s over `[from, to)` seconds.
    pub fn tokens_per_s(&self, from: f64, to: f64) -> f64 {
        self.mean_tokens_per_s(from, to, 1, |_| true).unwrap_or(0.0)
    }

    /// Mean tokens/s over the seconds of `[from, to)` in which no prompt was
    /// prefilled: steady decode, what a plan's `tokens_per_s` predicts; `None`
    /// when fewer than `least` such seconds are left.
    pub fn decode_tokens_per_s(&self, from: f64, to: f64, least: usize) -> Option<f64> {
        self.mean_tokens_per_s(from, to, least, |s| {
            !self.prefilling.get(s).copied().unwrap_or(false)
        })
    }

    /// Mean tokens/s over the whole seconds of `[from, to)` that `keep` keeps;
    /// `None` when it keeps fewer than `least` (at least one).
    fn mean_tokens_per_s(
        &self,
        from: f64,
        to: f64,
        least: usize,
        keep: impl Fn(usize) -> bool,
    ) -> Option<f64> {
        let seconds = from.max(0.0) as usize..(to as usize).min(self.pieces.len());
        let kept: Vec<u64> = seconds
            .filter(|&s| keep(s))
            .map(|s| self.pieces[s])
            .collect();
        (kept.len() >= least.max(1))
            .then(|| kept.iter().sum::<u64>() as f64 / kept.len() as f64 * self.tokens_per_piece)
    }

    /// The first verdict published at or after `t` seconds.
    pub fn review_after(&self, t: f64) -> Option<&ReviewSeen> {
        self.reviews.iter().find(|r| r.at_s >= t)
    }

    /// The first plan published at or after `t` seconds.
    pub fn plan_after(&self, t: f64) -> Option<&PlanSeen> {
        self.plans.iter().find(|p| p.at_s >= t)
    }

    /// The link reports over `[from, to]` seconds, one line each, to explain
    /// a plan.
    pub fn link_reports(&self, from: f64, to: f64) -> String {
        self.links
            .iter()
            .filter(|l| (from..=to).contains(&l.at_s))
            .map(|l| {
                format!(
                    "{:6.2} s {}→{} {:.0} Mb/s ({} samples, newest {} ms old)\n",
                    l.at_s, l.from, l.to, l.mbit_per_s, l.samples, l.age_ms
                )
            })
            .collect()
    }
}

/// Prompt templates; request `n` uses `n % TEMPLATES`.
pub const TEMPLATES: usize = 8;

/// The request of template `k` (greedy, fixed length).
pub fn request(k: usize, max_tokens: u32) -> Request {
    let words = [
        "robot", "arm", "dock", "battery", "path", "left", "obstacle", "grip",
    ];
    let prompt: Vec<&str> = (0..3 + k)
        .map(|j| words[(k + j * 3) % words.len()])
        .collect();
    Request {
        prompt: Some(prompt.join(" ")),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        return_token_ids: true,
        ..Default::default()
    }
}

/// Marks every second that `[sent, answered]` touches as one with a prefill.
fn mark_prefilling(seconds: &mut Vec<bool>, sent: f64, answered: f64) {
    let a = sent.max(0.0) as usize;
    let b = (answered.max(0.0) as usize).max(a);
    if seconds.len() <= b {
        seconds.resize(b + 1, false);
    }
    seconds[a..=b].iter_mut().for_each(|s| *s = true);
}

/// Runs the scenario on `fabric` (one namespace per stage).
pub async fn run(
    spec: &SwingSpec,
    fabric: &Fabric,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<SwingRun> {
    fabric.shape_all(spec.high_mbit_per_s)?;
    let mut cluster_spec = ClusterSpec::new(&spec.model, 4, &spec.dir);
    let mut planner = PlannerSpec::new("bursty", spec.concurrency, 256);
    planner.link_mbit_per_s = spec.high_mbit_per_s;
    planner.link_latency_ms = 0.1;
    planner.adapt = spec.adapt;
    // The scenario asks whether the planner follows each swing, as it would
    // bandwidth that changed for good. Its phases are short, and with 16 long
    // sequences cached the switch back repays itself in 12-31 s: near the
    // default 30 s horizon, so whether the planner follows would depend on how
    // many tokens happen to be cached at the change.
    planner.payback_s = PAYBACK_S;
    cluster_spec.planner = Some(planner);
    cluster_spec.memory = MemorySpec {
        stage_budget_bytes: vec![spec.budget_bytes; 4],
        stage_read_mb_per_s: vec![spec.read_mb_per_s; 4],
        read_mb_per_s: Some(spec.read_mb_per_s),
        ..MemorySpec::default()
    };
    cluster_spec.compute_threads = Some(1);
    cluster_spec.compute_slowdown = spec.compute_slowdown;
    cluster_spec.telemetry_ms = Some(250);
    cluster_spec.namespaces = Some(Namespaces {
        host_ip: fabric.host_ip(),
        stages: (0..4)
            .map(|i| (fabric.namespace(i), fabric.stage_ip(i)))
            .collect(),
    });
    progress("starting 4 stages in network namespaces (profiling each first)");
    let mut cluster = Cluster::start(&cluster_spec).await?;
    cluster.wait_online(Duration::from_secs(120)).await?;
    progress("cluster online; load running");
    let run = load(spec, fabric, &cluster.broker, &mut progress).await;
    cluster.stop();
    run
}

/// The closed loop: `concurrency` requests in flight, each replaced when it
/// ends, until the phases are over; then the stragglers are awaited.
async fn load(
    spec: &SwingSpec,
    fabric: &Fabric,
    broker: &BrokerAddr,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<SwingRun> {
    let (client, mut eventloop, id) = broker.connect("lime-swing");
    let reply_topic = lime_schemas::topics::tool_replies(broker.username.as_deref(), &id);
    client.subscribe(&reply_topic, QoS::AtLeastOnce).await?;
    client.subscribe(topics::PLAN, QoS::AtLeastOnce).await?;
    client
        .subscribe(topics::PLAN_REVIEW, QoS::AtLeastOnce)
        .await?;
    client
        .subscribe(topics::TELEMETRY_ALL, QoS::AtMostOnce)
        .await?;
    let mut out = SwingRun {
        adapt: spec.adapt,
        ..SwingRun::default()
    };
    let total: f64 = spec.phases_s.iter().sum();
    let switches = [
        (spec.phases_s[0], spec.low_mbit_per_s),
        (spec.phases_s[0] + spec.phases_s[1], spec.high_mbit_per_s),
    ];
    let started = Instant::now();
    let mut in_flight: BTreeMap<usize, usize> = BTreeMap::new();
    // Requests not yet answered with a first piece, and when they were sent.
    let mut awaiting: BTreeMap<usize, f64> = BTreeMap::new();
    let mut next = 0usize;
    let (mut pieces, mut tokens) = (0u64, 0u64);
    let send = |n: usize| {
        let client = client.clone();
        let reply_topic = reply_topic.clone();
        let mut r = request(n % TEMPLATES, spec.max_tokens);
        r.id = Some(format!("swing-{n}"));
        async move {
            let props = PublishProperties {
                response_topic: Some(reply_topic),
                correlation_data: Some(n.to_string().into_bytes().into()),
                ..Default::default()
            };
            let payload = serde_json::to_vec(&r)?;
            client
                .publish_with_properties(topics::REQUEST, QoS::AtLeastOnce, false, payload, props)
                .await?;
            anyhow::Ok(())
        }
    };
    while next < spec.concurrency {
        send(next).await?;
        awaiting.insert(next, started.elapsed().as_secs_f64());
        in_flight.insert(next, next % TEMPLATES);
        next += 1;
    }
    let mut shaped = 0;
    let hard_end = total + 90.0;
    let mut last_note = 0.0;
    loop {
        let now = started.elapsed().as_secs_f64();
        if let Some(&(at, mbit)) = switches.get(shaped) {
            if now >= at {
                fabric.shape_all(mbit)?;
                out.shaped.push((now, mbit));
                progress(&format!("{now:.1} s: links now {mbit} Mb/s"));
                shaped += 1;
            }
        }
        if (now >= total && in_flight.is_empty()) || now > hard_end {
            break;
        }
        if now - last_note >= 5.0 {
            last_note = now;
            progress(&format!(
                "{now:.0} s: {} answers, {} in flight",
                out.completed,
                in_flight.len()
            ));
        }
        let event = match tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await {
            Err(_) => continue,
            Ok(e) => e?,
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let now = started.elapsed().as_secs_f64();
        if p.topic.as_ref() == topics::PLAN.as_bytes() {
            if let Ok(plan) = serde_json::from_slice::<Plan>(&p.payload) {
                progress(&format!("{now:.1} s: plan epoch {} published", plan.epoch));
                out.plans.push(PlanSeen {
                    at_s: now,
                    epoch: plan.epoch,
                    starter: plan.starter().map(|s| s.name.clone()).unwrap_or_default(),
                    prediction: plan.prediction,
                    rebuilt_at_s: None,
                });
            }
            continue;
        }
        if p.topic.as_ref() == topics::PLAN_REVIEW.as_bytes() {
            if let Ok(review) = serde_json::from_slice::<PlanReview>(&p.payload) {
                let verdict = if review.kept { "kept" } else { "switching" };
                progress(&format!(
                    "{now:.1} s: planner weighed {}: {verdict}",
                    review.changes
                ));
                out.reviews.push(ReviewSeen { at_s: now, review });
            }
            continue;
        }
        if let Ok(t) = serde_json::from_slice::<Telemetry>(&p.payload) {
            if let Some(l) = &t.link_out {
                out.links.push(LinkSeen {
                    at_s: now,
                    from: t.stage.clone(),
                    to: l.to.clone(),
                    mbit_per_s: l.mbit_per_s,
                    samples: l.samples,
                    age_ms: l.age_ms,
                });
            }
            if let Some(plan) = out.plans.last_mut().filter(|plan| {
                plan.rebuilt_at_s.is_none()
                    && plan.epoch == t.epoch
                    && plan.starter == t.stage
                    && t.rebuilding == 0
            }) {
                progress(&format!(
                    "{now:.1} s: caches rebuilt under epoch {}",
                    plan.epoch
                ));
                plan.rebuilt_at_s = Some(now);
            }
            continue;
        }
        let n = p
            .properties
            .as_ref()
            .and_then(|pr| pr.correlation_data.as_ref())
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<usize>().ok());
        let Some(n) = n else { continue };
        let ended = match Reply::parse(&p.payload) {
            Ok(Reply::Text(_)) => {
                let second = now as usize;
                if out.pieces.len() <= second {
                    out.pieces.resize(second + 1, 0);
                }
                out.pieces[second] += 1;
                pieces += 1;
                if let Some(sent) = awaiting.remove(&n) {
                    mark_prefilling(&mut out.prefilling, sent, now);
                }
                false
            }
            Ok(Reply::Final(f)) => {
                out.completed += 1;
                tokens += u64::from(f.usage.completion_tokens);
                if let (Some(k), Some(ids)) = (in_flight.get(&n), f.token_ids) {
                    out.tokens.entry(*k).or_default().push(ids);
                }
                true
            }
            Ok(Reply::Error(e)) => {
                out.failed.push(format!("request {n}: {}", e.error.message));
                true
            }
            Ok(Reply::Queued(_)) => false,
            Err(e) => {
                out.failed
                    .push(format!("request {n}: unreadable reply: {e}"));
                true
            }
        };
        // An answer that ended without a piece (an error) still had its prompt read.
        let unanswered = if ended { awaiting.remove(&n) } else { None };
        if let Some(sent) = unanswered {
            mark_prefilling(&mut out.prefilling, sent, now);
        }
        if ended && in_flight.remove(&n).is_some() && now < total {
            send(next).await?;
            awaiting.insert(next, started.elapsed().as_secs_f64());
            in_flight.insert(next, next % TEMPLATES);
            next += 1;
        }
    }
    for n in in_flight.keys() {
        out.failed.push(format!("request {n}: no answer"));
    }
    out.tokens_per_piece = if pieces > 0 {
        tokens as f64 / pieces as f64
    } else {
        1.0
    };
    out.pieces.truncate(total.ceil() as usize);
    out.prefilling.resize(out.pieces.len(), false);
    let _ = client.disconnect().await;
    Ok(out)
}

/// `lime bench swing`: the scenario (its middle phase at `low_mbit` for `low_s`)
/// with the adaptive planner, then with the first plan held, side by side;
/// writes `swing.svg` and `swing.md` to `out` and returns the table.
pub async fn bench(
    model: &std::path::Path,
    out: &std::path::Path,
    low_mbit: f64,
    low_s: f64,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        low_mbit.is_finite() && low_mbit >= 1.0 && low_s.is_finite() && low_s >= 5.0,
        "the middle phase needs at least 1 Mb/s and 5 s"
    );
    let scenario = |dir: PathBuf, adapt: bool| {
        let mut spec = SwingSpec::standard(model.to_path_buf(), dir, adapt);
        spec.low_mbit_per_s = low_mbit;
        spec.phases_s[1] = low_s;
        spec
    };
    if let Some(why) = Fabric::unavailable() {
        anyhow::bail!("the swing needs network namespaces: {why}");
    }
    std::fs::create_dir_all(out)?;
    let fabric = Fabric::create("swb", 4)?;
    let mut runs = Vec::new();
    for adapt in [true, false] {
        let dir = out.join(if adapt { "adaptive" } else { "fixed" });
        let spec = scenario(dir, adapt);
        let mode = if adapt { "adaptive" } else { "fixed" };
        runs.push(run(&spec, &fabric, |m| eprintln!("swing ({mode}): {m}")).await?);
    }
    let phases = scenario(out.to_path_buf(), true).phases_s;
    let low = format!("{low_mbit} Mb/s");
    std::fs::write(out.join("swing.svg"), svg(&[&runs[0], &runs[1]], phases))?;
    let (a, b) = (phases[0], phases[0] + phases[1]);
    let total: f64 = phases.iter().sum();
    let windows = [
        ("1 Gb/s".to_string(), 2.0, a),
        (low.clone(), a, b),
        (format!("{low}, from 10 s after the drop"), a + 10.0, b),
        ("1 Gb/s again".to_string(), b, total),
        ("1 Gb/s again, from 5 s after".to_string(), b + 5.0, total),
        ("whole run".to_string(), 2.0, total),
    ];
    let mut table = String::from(
        "| window | adaptive tokens/s | initial plan held tokens/s | adaptive / held |\n|---|---|---|---|\n",
    );
    for (name, from, to) in windows {
        let (x, y) = (
            runs[0].tokens_per_s(from, to),
            runs[1].tokens_per_s(from, to),
        );
        table += &format!("| {name} | {x:.1} | {y:.1} | {:.2}x |\n", x / y.max(1e-9));
    }
    for r in &runs {
        table += &format!(
            "\n{}: {} answers, {} failed; plans:",
            if r.adapt { "adaptive" } else { "held" },
            r.completed,
            r.failed.len()
        );
        for p in &r.plans {
            let (tps, why) = p
                .prediction
                .as_ref()
                .map_or((0.0, ""), |x| (x.tokens_per_s, x.reason.as_str()));
            let rebuilt = p
                .rebuilt_at_s
                .map(|r| format!(", caches rebuilt {:.1} s later", r - p.at_s))
                .unwrap_or_default();
            table += &format!(
                " [{:.1} s: predicted {tps:.1} tokens/s, {why}{rebuilt}]",
                p.at_s
            );
        }
    }
    table.push('\n');
    std::fs::write(out.join("swing.md"), &table)?;
    Ok(table)
}

/// Throughput over time, adaptive against fixed, as an SVG line chart with the
/// low-bandwidth phase shaded and new plans marked.
pub fn svg(runs: &[&SwingRun], phases_s: [f64; 3]) -> String {
    let (w, h, left, bottom, top) = (760.0, 360.0, 60.0, 40.0, 30.0);
    let total: f64 = phases_s.iter().sum();
    let series: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| {
            (0..total as usize)
                .map(|s| r.tokens_per_s(s as f64, s as f64 + 1.0))
                .collect()
        })
        .collect();
    let peak = series.iter().flatten().fold(1.0f64, |m, &v| m.max(v)) * 1.1;
    let x = |t: f64| left + t / total * (w - left - 20.0);
    let y = |v: f64| h - bottom - v / peak * (h - bottom - top);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let (lo, hi) = (phases_s[0], phases_s[0] + phases_s[1]);
    s += &format!(
        "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#eee\"/>\n<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">links at low bandwidth</text>\n",
        x(lo),
        x(hi) - x(lo),
        h - bottom - top,
        (x(lo) + x(hi)) / 2.0,
        top - 8.0
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>\n",
        h - bottom,
        w - 20.0
    );
    for i in 0..=4 {
        let v = peak * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            left - 6.0,
            y(v) + 4.0
        );
    }
    for t in (0..=total as usize).step_by(5) {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t}</text>\n",
            x(t as f64),
            h - bottom + 16.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds</text>\n<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">tokens/s</text>\n",
        (left + w) / 2.0,
        h - 6.0,
        h / 2.0,
        h / 2.0
    );
    let colours = ["#1f77b4", "#d62728"];
    for (i, (r, points)) in runs.iter().zip(&series).enumerate() {
        let colour = colours[i % colours.len()];
        let path: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(t, v)| format!("{:.1},{:.1}", x(t as f64 + 0.5), y(*v)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for p in r.plans.iter().skip(1) {
            s += &format!(
                "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"/>\n",
                x(p.at_s),
                h - bottom
            );
        }
        let label = if r.adapt {
            "adaptive (dashed: new plan)"
        } else {
            "initial plan held"
        };
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{label}</text>\n",
            w - 230.0,
            top + 16.0 + 16.0 * i as f64
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_throughput_leaves_out_the_seconds_of_prefills() {
        let mut run = SwingRun {
            pieces: vec![10, 10, 2, 10, 10, 10],
            tokens_per_piece: 2.0,
            ..SwingRun::default()
        };
        // A prompt sent at 1.5 s and answered at 2.2 s touches seconds 1 and 2.
        mark_prefilling(&mut run.prefilling, 1.5, 2.2);
        assert_eq!(run.prefilling, vec![false, true, true]);
        assert_eq!(run.decode_tokens_per_s(0.0, 6.0, 3), Some(20.0));
        assert_eq!(run.decode_tokens_per_s(0.0, 6.0, 5), None);
        // The plain mean counts every second.
        assert!((run.tokens_per_s(0.0, 6.0) - 104.0 / 6.0).abs() < 1e-9);
    }
}
