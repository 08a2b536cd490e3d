//! lime as systemd services: the unit files pass `systemd-analyze verify`, and
//! lime-broker and lime-stage speak the notify protocol (readiness, status,
//! watchdog, stopping) to a socket standing in for systemd's.

mod common;

use lime_client::binaries::sibling;
use lime_kernels::synth::{Preset, StoredDtype, SynthSpec};
use lime_schemas::{Plan, PlanStage};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WATCHDOG: Duration = Duration::from_millis(400);

#[test]
fn the_units_pass_systemd_analyze_verify() {
    common::require("systemd-analyze");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the binaries just built,
    // and name the template's instance.
    let bin = sibling("lime-broker").unwrap();
    let bin_dir = bin.parent().unwrap().display().to_string();
    let mut names = Vec::new();
    for (file, instance) in [
        ("lime-broker.service", "lime-broker.service"),
        ("lime-stage@.service", "lime-stage@s0.service"),
    ] {
        let text = std::fs::read_to_string(units.join(file)).unwrap();
        assert!(text.contains("/usr/local/bin/"), "{file}: ExecStart moved");
        std::fs::write(
            dir.path().join(instance),
            text.replace("/usr/local/bin", &bin_dir),
        )
        .unwrap();
        names.push(instance);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values and only prints them.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n)))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
    for unit in ["lime-broker.service", "lime-stage@.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        for line in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "User=lime",
            "StandardOutput=journal",
            "EnvironmentFile=-/etc/lime/lime.env",
        ] {
            assert!(text.contains(line), "{unit} lacks {line}");
        }
    }
    assert!(std::fs::read_to_string(units.join("lime-stage@.service"))
        .unwrap()
        .contains("ReadOnlyPaths=/etc/lime /var/lib/lime/models"));
}

/// A socket standing in for systemd's `NOTIFY_SOCKET`, drained as systemd
/// drains it (a sender blocks when the queue is full).
struct FakeSystemd {
    path: std::path::PathBuf,
    /// Every message so far, with when it came.
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl FakeSystemd {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    into.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        Self {
            path,
            received,
            stop,
        }
    }

    fn seen(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received.iter().map(|(_, m)| m.clone()).collect()
    }

    /// Waits up to `timeout` for a message with the line `line`.
    fn wait_for(&self, line: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.seen().iter().any(|m| m.lines().any(|l| l == line)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Watchdog messages received during the next `span`.
    fn count_watchdog(&self, span: Duration) -> usize {
        let from = Instant::now();
        std::thread::sleep(span);
        let received = self.received.lock().unwrap();
        received
            .iter()
            .filter(|(at, m)| *at >= from && m.lines().any(|l| l == "WATCHDOG=1"))
            .count()
    }

    /// Starts `program` as systemd would: `NOTIFY_SOCKET`, and a watchdog of
    /// [`WATCHDOG`] addressed to its own pid (the shell's, kept by `exec`).
    fn spawn(&self, program: &Path, args: &[&str], log: &Path) -> Child {
        let mut script = format!("export WATCHDOG_PID=$$; exec '{}'", program.display());
        for a in args {
            script.push_str(&format!(" '{a}'"));
        }
        Command::new("sh")
            .args(["-c", &script])
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts lime-broker under a fake systemd; returns it with its MQTT 5 port.
fn broker(fake: &FakeSystemd, dir: &Path) -> (Child, u16) {
    let (v4, v5) = (free_port(), free_port());
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "allow_anonymous = true\nv4_listen = \"127.0.0.1:{v4}\"\nv5_listen = \"127.0.0.1:{v5}\"\n"
        ),
    )
    .unwrap();
    let child = fake.spawn(
        &sibling("lime-broker").unwrap(),
        &["--config", config.to_str().unwrap()],
        &dir.join("broker.log"),
    );
    (child, v5)
}

#[test]
fn the_broker_says_when_it_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSystemd::new(dir.path());
    let (mut child, v5) = broker(&fake, dir.path());
    assert!(
        fake.wait_for("READY=1", Duration::from_secs(20)),
        "no READY=1; got {:?}; log:\n{}",
        fake.seen(),
        std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
    );
    // Ready means it serves: the MQTT port takes connections already.
    std::net::TcpStream::connect(("127.0.0.1", v5)).expect("READY=1 before the port listens");
    let fed = fake.count_watchdog(WATCHDOG * 5);
    assert!(
        (5..=15).contains(&fed),
        "{fed} watchdog messages in five periods (every half period expected)"
    );
    terminate(&mut child);
    assert!(
        fake.wait_for("STOPPING=1", Duration::from_secs(10)),
        "no STOPPING=1 on SIGTERM; got {:?}",
        fake.seen()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "lime-broker ended with {status}");
}

#[test]
fn a_stage_says_what_it_does_is_ready_once_loaded_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    lime_kernels::synth::synthesize(
        &SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 3),
        &model,
        &mut |_, _| {},
    )
    .unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker_fake = FakeSystemd::new(&broker_dir);
    let (mut broker, v5) = broker(&broker_fake, &broker_dir);
    assert!(broker_fake.wait_for("READY=1", Duration::from_secs(20)));

    let plan = Plan::even(
        1,
        vec![PlanStage {
            name: "s0".into(),
            data_addr: "127.0.0.1:1".into(),
            offloaded: None,
        }],
        1,
        12,
    )
    .unwrap();
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_string(&plan).unwrap()).unwrap();
    let config = dir.path().join("stage-s0.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"s0\"\nmodel = {:?}\nplan_file = {:?}\ntelemetry_ms = 100\n\n[broker]\nhost = \"127.0.0.1\"\nport = {v5}\n",
            model.display().to_string(),
            plan_file.display().to_string()
        ),
    )
    .unwrap();
    let stage_dir = dir.path().join("stage");
    std::fs::create_dir_all(&stage_dir).unwrap();
    let fake = FakeSystemd::new(&stage_dir);
    let log = dir.path().join("s0.log");
    let mut stage = fake.spawn(
        &sibling("lime-stage").unwrap(),
        &["--config", config.to_str().unwrap()],
        &log,
    );
    let ready = fake.wait_for("READY=1", Duration::from_secs(60));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ready,
        "no READY=1; got {:?}; log:\n{}",
        fake.seen(),
        log_text()
    );
    // Before READY it said what it was doing, loading included.
    let seen = fake.seen();
    let statuses: Vec<&str> = seen
        .iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| l.strip_prefix("STATUS="))
        .collect();
    assert!(
        statuses.iter().any(|s| s.starts_with("loading layers")),
        "statuses: {statuses:?}"
    );
    assert!(
        log_text().contains("weights loaded"),
        "READY=1 before the weights were loaded:\n{}",
        log_text()
    );
    let fed = fake.count_watchdog(WATCHDOG * 5);
    assert!(
        (5..=15).contains(&fed),
        "{fed} watchdog messages in five periods"
    );
    // The single-stage ring serves; the stage stays fed while it works.
    let answers = common::runtime().block_on(async {
        let broker = lime_client::mqtt::BrokerAddr::parse(&format!("127.0.0.1:{v5}")).unwrap();
        let requests = common::varied_requests(4);
        common::ask(&broker, &requests).await
    });
    assert!(answers.iter().all(|a| a.outcome.is_ok()), "{answers:?}");
    assert!(fake.count_watchdog(WATCHDOG * 2) >= 2);

    terminate(&mut stage);
    assert!(
        fake.wait_for("STOPPING=1", Duration::from_secs(10)),
        "no STOPPING=1; got {:?}",
        fake.seen()
    );
    assert!(stage.wait().unwrap().success());
    terminate(&mut broker);
    assert!(broker_fake.wait_for("STOPPING=1", Duration::from_secs(10)));
    assert!(broker.wait().unwrap().success());
}
