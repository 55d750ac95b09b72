//! A child process whose output goes to files in a test directory, is killed when
//! dropped, and whose output is printed when the test that owns it fails.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Logged {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Logged {
    /// Spawns `cmd` with stdout and stderr appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log file");
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Logged {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("process is running")
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.pid();
        assert!(self.send_term(), "kill -TERM {pid} failed");
        match self.wait_exit(within) {
            Some(status) => {
                self.child = None;
                status
            }
            None => {
                self.kill();
                panic!(
                    "{} did not exit within {within:?} of SIGTERM\n{}",
                    self.name,
                    self.tail()
                );
            }
        }
    }

    /// SIGTERM, then SIGKILL if the process has not exited `within`: for a process
    /// with children of its own (nginx's master and its workers), which SIGKILL alone
    /// would leave running.
    pub fn stop(&mut self, within: Duration) {
        if self.child.is_none() {
            return;
        }
        self.send_term();
        self.wait_exit(within);
        self.kill();
    }

    /// Whether `kill -TERM` was delivered.
    fn send_term(&self) -> bool {
        Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The exit status, once the process exits within `within`.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the output, for failure messages.
    pub fn tail(&self) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(80);
        format!(
            "----- {} ({}) -----\n{}\n-----",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || std::env::var_os("PORTCULLIS_TEST_LOGS").is_some() {
            eprintln!("{}", self.tail());
        }
    }
}
