//! Running external commands (`ip`, CNI plugins, `nodemesh certs`) with a
//! deadline, optional stdin and extra environment, capturing their output.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::LabError;

/// Default deadline of a command: generous, `ip` and plugins take milliseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A command to run.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// Standard output, lossily decoded.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Cmd {
    /// A command running `program`.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `ip netns exec <netns> <program>`: runs `program` inside a namespace.
    pub fn in_netns(netns: &str, program: impl Into<String>) -> Self {
        Self::new("ip").args(["netns", "exec", netns]).arg(program)
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable (on top of the inherited environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Bytes written to the command's standard input (then closed).
    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    /// Deadline after which the command is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command and returns its output whatever its exit status.
    pub fn output(&self) -> Result<Output, LabError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: the terminal's Ctrl-C reaches the lab only,
            // which then stops at its next step and cleans up in order.
            .process_group(0);
        let mut child = command.spawn().map_err(|source| LabError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let stdin = child.stdin.take();
        let input = self.stdin.clone();
        let writer = std::thread::spawn(move || {
            if let (Some(mut pipe), Some(bytes)) = (stdin, input) {
                // A plugin may exit without reading its input: ignore EPIPE.
                let _ = pipe.write_all(&bytes);
            }
        });
        let out_reader = child.stdout.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        });
        let err_reader = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        });
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(self.timeout) {
            Ok(status) => status,
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waiter.join();
                return Err(LabError::CommandTimeout {
                    command: self.display(),
                    timeout: self.timeout,
                });
            }
        }
        .map_err(|source| LabError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let _ = waiter.join();
        let _ = writer.join();
        let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        Ok(Output {
            status,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }

    /// Runs the command and fails unless it exits 0.
    pub fn run(&self) -> Result<Output, LabError> {
        let out = self.output()?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(LabError::CommandFailed {
                command: self.display(),
                status: out.status.to_string(),
                stderr: out.stderr.trim().to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_and_stdin() {
        let out = Cmd::new("cat").stdin(b"hello".to_vec()).run().expect("cat");
        assert_eq!(out.stdout, b"hello");
    }

    #[test]
    fn failure_carries_command_and_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .expect_err("exit 3");
        let msg = err.to_string();
        assert!(msg.contains("oops") && msg.contains("sh -c"), "{msg}");
    }

    #[test]
    fn timeout_kills() {
        let err = Cmd::new("sleep")
            .arg("30")
            .timeout(Duration::from_millis(100))
            .run()
            .expect_err("timeout");
        assert!(matches!(err, LabError::CommandTimeout { .. }), "{err}");
    }
}
