//! Child processes for end-to-end tests: output captured to a file, killed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How long `terminate` waits for a graceful exit before SIGKILL.
const TERM_DEADLINE: Duration = Duration::from_secs(30);

/// The built `gsb` binary: `$GSB_BIN`, else `target/<profile>/gsb` next to the test's `deps/`.
pub fn gsb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GSB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current test executable path");
    // target/debug/deps/<test>-hash -> target/debug/gsb
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("gsb");
    assert!(
        bin.is_file(),
        "the gsb binary is not built at {}: run `cargo build -p gsb` first (or set GSB_BIN)",
        bin.display()
    );
    bin
}

/// A spawned child process, stdout and stderr captured to one file; killed (SIGKILL) on drop,
/// and the output's tail printed if the test is failing.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    /// Holds the log file's directory; removed on drop.
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns `cmd` (its stdio replaced by the capture file); panics with the reason on failure.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix("gsb-proc-")
            .tempdir()
            .expect("temp dir for process output");
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("creating the process log");
        let err = out.try_clone().expect("duplicating the log handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            pid: child.id(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the captured output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the output.
    pub fn tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Only signal a child not yet reaped: a reaped pid may already name another process.
            if matches!(c.try_wait(), Ok(None)) {
                let _ = signal::kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after 30 s); returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(Signal::SIGTERM)
    }

    /// SIGINT (Ctrl-C) and wait for the exit (SIGKILL after 30 s); returns the exit status.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.signal_and_wait(Signal::SIGINT)
    }

    fn signal_and_wait(&mut self, sig: Signal) -> ExitStatus {
        let mut c = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{} was already reaped", self.name));
        let _ = signal::kill(Pid::from_raw(c.id() as i32), sig);
        let deadline = Instant::now() + TERM_DEADLINE;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{} did not exit within {TERM_DEADLINE:?} after {sig}; output tail:\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- last output of {} (pid {}) ----\n{}\n---- end of {} ----",
                self.name,
                self.pid,
                self.tail(60),
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_terminates() {
        let mut p = Proc::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo hello; echo oops >&2; exec sleep 60"]),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.output().contains("oops") {
            assert!(Instant::now() < deadline, "no output: {}", p.output());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.output().contains("hello"));
        assert!(p.is_running());
        let st = p.terminate();
        assert!(!st.success());
    }

    #[test]
    fn kill9_stops_the_process() {
        let mut p = Proc::spawn("sleep", Command::new("sleep").arg("60"));
        let pid = p.pid();
        p.kill9();
        assert!(!p.is_running());
        // The pid no longer names a live process of ours.
        assert!(signal::kill(Pid::from_raw(pid as i32), None).is_err());
    }
}
