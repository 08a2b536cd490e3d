//! Robots as the tests play them: `mosquitto_sub` and `mosquitto_pub` processes,
//! and the JSON lines they print.

use super::require;
use lime_schemas::{Final, Reply, Request};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `mosquitto_sub`, subscribed (its SUBACK seen) before this returns.
pub struct Sub {
    child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Sub {
    pub fn start(args: &[&str]) -> Self {
        require("mosquitto_sub");
        // stdbuf: mosquitto_sub block-buffers its debug lines on a pipe.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(args)
            .arg("-d")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let sub = Self { child, lines: rx };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = sub
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("mosquitto_sub did not subscribe");
            if line.contains("SUBACK") {
                return sub;
            }
        }
    }

    /// Message lines (debug output skipped) until one holds a final or an error.
    pub fn until_done(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no final message; got {got:?}"));
            if !line.contains("{\"") {
                continue;
            }
            let last = line.contains("\"done\":true") || line.contains("\"error\"");
            got.push(line);
            if last {
                return got;
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn publish(args: &[&str]) -> std::process::Output {
    require("mosquitto_pub");
    Command::new("mosquitto_pub").args(args).output().unwrap()
}

/// Reads text pieces then the final message from JSON lines.
pub fn read_stream(lines: &[String]) -> (String, Final) {
    let mut text = String::new();
    for (i, line) in lines.iter().enumerate() {
        match Reply::parse(line.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}")) {
            Reply::Text(p) => {
                assert_eq!(p.seq as usize, i, "pieces in order");
                text.push_str(&p.text);
            }
            Reply::Final(f) => return (text, f),
            Reply::Queued(_) => {}
            Reply::Error(e) => panic!("error reply: {e:?}"),
        }
    }
    panic!("no final message in {lines:?}")
}

/// A robot's request, asking for token ids and final logits so that the
/// answer can be checked bit for bit.
pub fn robot_request(id: &str, max_tokens: u32) -> Request {
    Request {
        id: Some(id.into()),
        prompt: Some("Robot arm, stop at the obstacle".into()),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        return_token_ids: true,
        return_logits: true,
        ..Default::default()
    }
}

/// A CA of its own and a server certificate it issued for `localhost` and
/// 127.0.0.1, made with the openssl command line in `dir`.
pub fn issue_certificate(
    dir: &std::path::Path,
    name: &str,
) -> lime_testbench::cluster::TlsIdentity {
    require("openssl");
    let file = |ext: &str| dir.join(format!("{name}{ext}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let path = |ext: &str| file(ext).display().to_string();
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_subject = format!("/CN={name} CA");
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", &ca_subject];
    ca.extend(new_key);
    let (ca_key, ca_pem) = (path("-ca.key"), path("-ca.pem"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    openssl(&ca);
    let (key, csr, cert, ext) = (path(".key"), path(".csr"), path(".pem"), path(".ext"));
    let mut request = vec!["req", "-subj", "/CN=localhost"];
    request.extend(new_key);
    request.extend(["-keyout", &key, "-out", &csr]);
    openssl(&request);
    std::fs::write(
        file(".ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    lime_testbench::cluster::TlsIdentity {
        ca_file: file("-ca.pem"),
        cert_file: file(".pem"),
        key_file: file(".key"),
    }
}
