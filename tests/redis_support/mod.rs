//! Redis servers for the Redis store's tests: the shared one at `REDIS_URL`, and private
//! `redis-server` processes (single or a 3-master cluster) that a test starts on free loopback
//! ports and that die with it.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use idem_runtime::RedisStore;
use idem_runtime::redis;

use crate::support::server_missing;

/// The shared Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A store on the shared Redis, or `None` after reporting it missing (a failure under CI). The
/// store connects lazily, so the server is pinged first: a missing Redis must not pass unnoticed
/// (a layered store would quietly go on through its database).
pub async fn shared_store() -> Option<RedisStore> {
    let url = redis_url();
    let mut conn = shared_conn().await?;
    if let Err(e) = redis::cmd("PING").query_async::<String>(&mut conn).await {
        server_missing("Redis", &url, e);
        return None;
    }
    match RedisStore::from_url(&url).await {
        Ok(store) => Some(store),
        Err(e) => {
            server_missing("Redis", &url, e);
            None
        }
    }
}

/// A plain connection to the shared Redis, for inspecting and tampering with records.
pub async fn shared_conn() -> Option<redis::aio::MultiplexedConnection> {
    let url = redis_url();
    let conn = async {
        redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
    };
    match conn.await {
        Ok(c) => Some(c),
        Err(e) => {
            server_missing("Redis", &url, e);
            None
        }
    }
}

/// How long a server may take to say it is ready.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// A `redis-server` process on a loopback port, in a temp dir of its own, without persistence.
///
/// It runs under a small `sh` watchdog that kills it when this test process's end of a pipe
/// closes, so it dies with the test process however that ends (a panic, an abort, or a server
/// held in a `static` that is never dropped). Dropping it kills it too.
pub struct RedisServer {
    pub port: u16,
    pid: u32,
    shell: Child,
    /// Closing it (drop) makes the watchdog kill the server.
    stdin: Option<ChildStdin>,
    /// Receives a message when the server process has exited.
    exited: Mutex<mpsc::Receiver<()>>,
    dir: PathBuf,
}

/// Why a server could not be started.
#[derive(Debug)]
pub enum StartError {
    /// `redis-server` is not installed.
    Missing(std::io::Error),
    /// It started but never became ready (e.g. the port was taken meanwhile).
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Missing(e) => write!(f, "redis-server cannot be run: {e}"),
            StartError::Failed(why) => f.write_str(why),
        }
    }
}

/// The watchdog: start redis-server, print its pid, kill it when stdin closes, and say when it
/// has exited.
const WATCHDOG: &str = r#"
exec 3<&0
redis-server "$@" &
pid=$!
echo "idem-test-pid $pid"
{
  read _ <&3
  # Only if it is still a redis-server (its pid could have been reused after it exited).
  if grep -q "redis-server" "/proc/$pid/cmdline" 2>/dev/null; then kill -9 $pid; fi
  rm -rf "$IDEM_TEST_DIR"
} &
wait $pid
echo "idem-test-exited $?"
"#;

impl RedisServer {
    /// A standalone server on a free port.
    pub fn start() -> Result<RedisServer, StartError> {
        Self::start_with(&[])
    }

    /// A server on a free port, with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Result<RedisServer, StartError> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::start_on(port, extra) {
                Ok(s) => return Ok(s),
                Err(StartError::Failed(why)) => last = why,
                Err(e) => return Err(e),
            }
        }
        Err(StartError::Failed(last))
    }

    /// A server on `port` (e.g. again on the port of one that was killed).
    pub fn start_on(port: u16, extra: &[&str]) -> Result<RedisServer, StartError> {
        let dir = std::env::temp_dir().join(format!(
            "idem-redis-test-{}-{port}-{}",
            std::process::id(),
            idem_runtime::Token::generate().to_hex()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| StartError::Failed(e.to_string()))?;
        // Fail with "missing" when the binary is not there, before the shell hides it.
        if let Err(e) = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        {
            return Err(StartError::Missing(e));
        }
        let port_s = port.to_string();
        let dir_s = dir.to_string_lossy().into_owned();
        let mut args = vec![
            "--port",
            &port_s,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_s,
            "--logfile",
            "",
        ];
        args.extend_from_slice(extra);
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("idem-redis-watchdog")
            .args(&args)
            .env("IDEM_TEST_DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(StartError::Missing)?;
        let stdin = shell.stdin.take();
        let stdout = shell.stdout.take().expect("piped stdout");

        // Read the server's log on a thread: it reports the pid, readiness, and the exit.
        let (tx, rx) = mpsc::channel::<Event>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = if let Some(pid) = line.strip_prefix("idem-test-pid ") {
                    Event::Pid(pid.trim().parse().unwrap_or(0))
                } else if line.starts_with("idem-test-exited") {
                    Event::Exited
                } else if line.contains("Ready to accept connections") {
                    Event::Ready
                } else {
                    Event::Log(line)
                };
                if tx.send(event).is_err() {
                    // Nobody listens any more: keep draining so the server never blocks.
                    continue;
                }
            }
        });

        let deadline = Instant::now() + START_PATIENCE;
        let mut pid = 0;
        let mut log = Vec::new();
        let fail = |why: String, mut shell: Child, stdin: Option<ChildStdin>| {
            drop(stdin);
            let _ = shell.wait();
            Err(StartError::Failed(why))
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Pid(p)) => pid = p,
                Ok(Event::Ready) => break,
                Ok(Event::Log(l)) => log.push(l),
                Ok(Event::Exited) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return fail(
                        format!("redis-server on port {port} exited: {}", log.join("\n")),
                        shell,
                        stdin,
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return fail(
                        format!("redis-server on port {port} was not ready in time"),
                        shell,
                        stdin,
                    );
                }
            }
        }
        // From now on only the exit matters.
        let (exit_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(e) = rx.recv() {
                if matches!(e, Event::Exited) {
                    let _ = exit_tx.send(());
                    return;
                }
            }
        });
        Ok(RedisServer {
            port,
            pid,
            shell,
            stdin,
            exited: Mutex::new(exited),
            dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL the server (no shutdown, no goodbye to clients) and wait until it is gone.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        self.exited
            .lock()
            .unwrap()
            .recv_timeout(START_PATIENCE)
            .expect("redis-server did not exit after SIGKILL");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // The watchdog kills the server and removes its directory.
        drop(self.stdin.take());
        let exited = self.exited.lock().unwrap().recv_timeout(START_PATIENCE);
        if matches!(exited, Err(mpsc::RecvTimeoutError::Timeout)) {
            // The watchdog did not do it: kill the server ourselves, so the shell can end.
            let _ = Command::new("kill")
                .args(["-9", &self.pid.to_string()])
                .status();
        }
        let _ = self.shell.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Event {
    Pid(u32),
    Ready,
    Exited,
    Log(String),
}

/// A loopback port that is free now, and whose cluster bus port (+10000) is free too.
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().unwrap().port();
        if port > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Start a private server, or report `redis-server` missing (a failure under CI).
pub fn start_or_skip() -> Option<RedisServer> {
    match RedisServer::start() {
        Ok(s) => Some(s),
        Err(StartError::Missing(e)) => {
            server_missing("redis-server", "PATH", e);
            None
        }
        Err(e) => panic!("could not start redis-server: {e}"),
    }
}

/// A 3-master Redis Cluster on free loopback ports, created with `redis-cli --cluster create`.
/// Its servers die with it (or with the test process).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Result<RedisCluster, StartError> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ])?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(StartError::Missing)?;
        if !out.status.success() {
            return Err(StartError::Failed(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // `create` returns once the slots are assigned and the nodes joined; each node then
        // reports `cluster_state:ok` when it has seen the others. Nothing pushes that state, so
        // ask each node, bounded.
        let deadline = Instant::now() + START_PATIENCE;
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .map_err(StartError::Missing)?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(StartError::Failed(format!(
                        "cluster node {} never reached cluster_state:ok",
                        node.addr()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(RedisCluster { nodes })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// Start a private cluster, or report `redis-server` missing (a failure under CI).
pub fn cluster_or_skip() -> Option<RedisCluster> {
    match RedisCluster::start() {
        Ok(c) => Some(c),
        Err(StartError::Missing(e)) => {
            server_missing("redis-server/redis-cli", "PATH", e);
            None
        }
        Err(e) => panic!("could not start a Redis Cluster: {e}"),
    }
}

/// Write a line to a child's stdin (a start signal).
pub fn signal(stdin: &mut ChildStdin) {
    stdin.write_all(b"go\n").expect("signal child");
    stdin.flush().expect("signal child");
}
