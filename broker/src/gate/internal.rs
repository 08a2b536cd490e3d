//! rumqttd's own listeners, behind the gate: loopback only, on ports picked at
//! start, and open only to a login made up at start that only this process
//! knows. The gate presents it for every client it lets through, and the planner
//! uses it; a client that finds these ports cannot log in to them.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Where the gate reaches rumqttd, and as whom.
#[derive(Debug, Clone)]
pub struct Internal {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    pub username: String,
    pub password: String,
}

impl Internal {
    /// Picks two free loopback ports and a random login.
    pub fn new() -> anyhow::Result<Self> {
        let free = || -> std::io::Result<SocketAddr> {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
        };
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| anyhow::anyhow!("no randomness for the internal login: {e}"))?;
        Ok(Self {
            v4: free()?,
            v5: free()?,
            // A `/` keeps it apart from every configured user: user names are
            // single topic levels.
            username: "lime-broker/gate".into(),
            password: secret.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// Waits until both ports are listening sockets of this process. The ports
    /// were free when picked, but another process could take one before rumqttd
    /// binds it; the gate must not hand clients (and its login) to that process.
    pub fn wait_owned(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match (owned(self.v4.port()), owned(self.v5.port())) {
                (Some(true), Some(true)) => return Ok(()),
                (None, _) | (_, None) => {
                    tracing::warn!(
                        "cannot read /proc to check who listens on the internal ports; trusting rumqttd"
                    );
                    return Ok(());
                }
                _ if Instant::now() >= deadline => anyhow::bail!(
                    "rumqttd is not listening on its internal ports {} and {} (another process may hold one)",
                    self.v4,
                    self.v5
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Whether a socket of this process listens on loopback `port`; `None` when
/// /proc cannot say.
fn owned(port: u16) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    let wanted = format!("0100007F:{port:04X}");
    // Columns: sl local_address rem_address st ... inode (the tenth).
    let inodes: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 9 && cols[1] == wanted && cols[3] == "0A").then_some(cols[9])
        })
        .collect();
    if inodes.is_empty() {
        return Some(false);
    }
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes.iter().any(|i| target == format!("socket:[{i}]"))
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_told_from_a_free_port() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(owned(port), Some(true));
        drop(listener);
        assert_eq!(owned(port), Some(false));
    }
}
