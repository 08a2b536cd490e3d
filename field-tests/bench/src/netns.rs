//! Network namespaces for field tests: one per stage, each joined by a veth pair
//! to a bridge in the host's namespace (where the broker and the robots' clients
//! live), with the stage's outgoing bandwidth shaped by `tc qdisc … tbf`. Needs
//! root and `ip`/`tc` (iproute2); [`Fabric::unavailable`] says why not.

use anyhow::Context;
use std::process::Command;
use std::sync::Mutex;

/// The bridge, namespaces and veth pairs; removed when dropped.
pub struct Fabric {
    tag: String,
    /// `10.<subnet>.0.0/24`.
    subnet: u8,
    stages: usize,
    /// Per stage, the handle and bucket of the shaping qdisc in place.
    shaping: Mutex<Vec<Option<(u32, u64)>>>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Fabric {
    /// Why namespaces cannot be made here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            return Some("network namespaces need root".into());
        }
        let probe = format!("lime-probe-{}", std::process::id());
        if let Err(e) = run(&["ip", "netns", "add", &probe]) {
            return Some(format!("`ip netns add` is not allowed here: {e:#}"));
        }
        let _ = run(&["ip", "netns", "del", &probe]);
        None
    }

    /// `stages` namespaces on a fresh bridge; `tag` keeps names unique (≤ 6
    /// characters: interface names are short). Fabrics of one process with
    /// different tags get different subnets, so they can coexist.
    pub fn create(tag: &str, stages: usize) -> anyhow::Result<Self> {
        let tag: String = tag.chars().take(6).collect();
        let salt = tag.bytes().fold(std::process::id(), |h, b| {
            h.wrapping_mul(31).wrapping_add(u32::from(b))
        });
        let subnet = 100 + (salt % 100) as u8;
        let fabric = Self {
            tag,
            subnet,
            stages,
            shaping: Mutex::new(vec![None; stages]),
        };
        let br = fabric.bridge();
        run(&["ip", "link", "add", &br, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", fabric.host_ip()),
            "dev",
            &br,
        ])?;
        run(&["ip", "link", "set", &br, "up"])?;
        for i in 0..stages {
            let (ns, host_end, ns_end) = (
                fabric.namespace(i),
                fabric.veth(i, 'h'),
                fabric.veth(i, 'n'),
            );
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            run(&["ip", "link", "set", &ns_end, "netns", &ns])?;
            run(&["ip", "link", "set", &host_end, "master", &br])?;
            run(&["ip", "link", "set", &host_end, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["ip", "netns", "exec", &ns];
                all.extend_from_slice(args);
                run(&all)
            };
            inside(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", fabric.stage_ip(i)),
                "dev",
                &ns_end,
            ])?;
            inside(&["ip", "link", "set", &ns_end, "up"])?;
            inside(&["ip", "link", "set", "lo", "up"])?;
        }
        Ok(fabric)
    }

    fn bridge(&self) -> String {
        format!("lbr{}", self.tag)
    }

    fn veth(&self, i: usize, end: char) -> String {
        format!("l{}{i}{end}", self.tag)
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("lime-{}-{i}", self.tag)
    }

    /// The bridge's address: where stages reach the broker.
    pub fn host_ip(&self) -> String {
        format!("10.{}.0.1", self.subnet)
    }

    pub fn stage_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, 10 + i)
    }

    /// Limits what stage `i` sends to `mbit_per_s`. The token bucket holds
    /// about 1 ms of traffic (never less than two full Ethernet frames): a
    /// bigger bucket lets a whole activation frame out at the veth's line rate
    /// whenever the link has been idle, which no real 50 Mb/s link does.
    ///
    /// A smaller bucket gets a fresh qdisc, dropping what was queued (as a real
    /// link's rate drop would): tbf changed in place keeps the packets queued
    /// under the old settings, and one larger than the new bucket (a 64 KiB
    /// segmentation-offload packet queued at a gigabit) can never be sent, so
    /// the link stalls until the next change.
    pub fn shape(&self, i: usize, mbit_per_s: f64) -> anyhow::Result<()> {
        let burst = ((mbit_per_s * 1e6 / 8.0 * 0.001) as u64).max(2 * 1514);
        let mut shaping = self.shaping.lock().unwrap_or_else(|e| e.into_inner());
        let current = shaping
            .get_mut(i)
            .with_context(|| format!("the fabric has no stage {i}"))?;
        let handle = match *current {
            Some((handle, old_burst)) if burst >= old_burst => handle,
            Some((handle, _)) => handle % 2 + 1,
            None => 1,
        };
        run(&[
            "ip",
            "netns",
            "exec",
            &self.namespace(i),
            "tc",
            "qdisc",
            "replace",
            "dev",
            &self.veth(i, 'n'),
            "root",
            "handle",
            &format!("{handle}:"),
            "tbf",
            "rate",
            &format!("{}kbit", (mbit_per_s * 1000.0) as u64),
            "burst",
            &burst.to_string(),
            "latency",
            "100ms",
        ])?;
        *current = Some((handle, burst));
        Ok(())
    }

    /// Shapes every stage's link.
    pub fn shape_all(&self, mbit_per_s: f64) -> anyhow::Result<()> {
        (0..self.stages).try_for_each(|i| self.shape(i, mbit_per_s))
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for i in 0..self.stages {
            let _ = run(&["ip", "netns", "del", &self.namespace(i)]);
            let _ = run(&["ip", "link", "del", &self.veth(i, 'h')]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge()]);
    }
}
