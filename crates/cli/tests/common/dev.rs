//! A `strongroom serve --dev` child process for end-to-end tests: a temp data dir, a free
//! port, real TLS; killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use strongroom_server::testing::{ClientOptions, TestClient};

/// A `strongroom serve --dev` child: its address, the lines it printed, and the process.
pub struct DevServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub banner: String,
    stderr: std::path::PathBuf,
}

fn binary() -> std::path::PathBuf {
    assert_cmd::cargo::cargo_bin("strongroom")
}

/// A user token for `subject` that a dev server over `data` accepts (`token mint --dev`,
/// ten minutes).
pub fn mint(data: &Path, subject: &str) -> String {
    let out = super::stdout_of(
        super::strongroom()
            .args(["token", "mint", "--dev", "--ttl", "600", "--data-dir"])
            .arg(data)
            .arg(subject),
    );
    String::from_utf8(out).unwrap().trim().to_owned()
}

pub fn start_dev(data: &Path, extra: &[&str]) -> DevServer {
    start_dev_env(data, extra, &[])
}

pub fn start_dev_env(data: &Path, extra: &[&str], envs: &[(&str, &str)]) -> DevServer {
    let stderr = data.with_extension("stderr.log");
    spawn_command(
        Command::new(binary()),
        data,
        extra,
        envs,
        std::fs::File::create(&stderr).unwrap(),
        stderr,
    )
}

/// A dev server started with the open-file limits `soft` and `hard`.
pub fn start_dev_with_open_files(data: &Path, soft: u32, hard: u32) -> DevServer {
    start_dev_with_limits(data, &[&format!("--nofile={soft}:{hard}")])
}

/// A dev server started under `prlimit` with `limits` (`--core=unlimited`, …).
pub fn start_dev_with_limits(data: &Path, limits: &[&str]) -> DevServer {
    start_dev_under(data, "prlimit", limits)
}

/// A dev server started by `program` with `args` before the binary (a wrapper that runs it:
/// `prlimit`, `strace`, …).
pub fn start_dev_under(data: &Path, program: &str, args: &[&str]) -> DevServer {
    let stderr = data.with_extension("stderr.log");
    let mut command = Command::new(program);
    command.args(args).arg(binary());
    spawn_command(
        command,
        data,
        &[],
        &[],
        std::fs::File::create(&stderr).unwrap(),
        stderr,
    )
}

/// A dev server (logging every request, at trace) whose stderr is a pipe nobody reads, as a log
/// shipper that stalled; the pipe's reading end, to keep while the server runs.
pub fn start_dev_stalled_stderr(data: &Path) -> (DevServer, std::io::PipeReader) {
    let (reader, writer) = std::io::pipe().unwrap();
    let server = spawn_command(
        Command::new(binary()),
        data,
        &[],
        &[("STRONGROOM_LOG__LEVEL", "trace")],
        writer,
        data.with_extension("unread-stderr"),
    );
    (server, reader)
}

/// A dev server whose stderr cannot be written (`/dev/full`: every write fails with "no
/// space left on device"), as when its log file's disk is full.
pub fn start_dev_unwritable_stderr(data: &Path) -> DevServer {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    spawn_command(
        Command::new(binary()),
        data,
        &[],
        &[],
        full,
        data.with_extension("no-stderr"),
    )
}

/// Runs `command` (the binary, or a wrapper that execs it) as `serve --dev`.
fn spawn_command(
    mut command: Command,
    data: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
    stderr_file: impl Into<Stdio>,
    stderr: std::path::PathBuf,
) -> DevServer {
    let mut child = command
        .envs(envs.iter().copied())
        .args(["serve", "--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env_remove("STRONGROOM_DATA_DIR")
        .env_remove("STRONGROOM_LISTEN")
        .env_remove("STRONGROOM_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_file)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut banner = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
                if line.starts_with("Stop with Ctrl-C") {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no banner; stdout so far:\n{banner}\nstderr:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        }
    }
    let url = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("listening on"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no listen line in:\n{banner}"));
    let addr: SocketAddr = url.strip_prefix("https://").unwrap().parse().unwrap();
    DevServer {
        child,
        addr,
        banner,
        stderr,
    }
}

impl DevServer {
    pub fn client(&self, data: &Path) -> TestClient {
        let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
        TestClient::new(self.addr, ClientOptions::new(ca)).unwrap()
    }

    /// The value of `export NAME='...'` in the banner.
    pub fn export(&self, name: &str) -> String {
        let prefix = format!("export {name}='");
        self.banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.strip_suffix('\''))
            .unwrap_or_else(|| panic!("no {name} in banner:\n{}", self.banner))
            .to_owned()
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.wait()
    }

    /// The exit status, once the process ends (within 30 s of this call).
    pub fn wait(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("no exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stderr once it holds `needle` (the log is written by a thread of its own, after the
    /// banner): within 30 s, or a panic.
    pub fn stderr_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.stderr();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in stderr:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
