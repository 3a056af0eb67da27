//! Profiles: what a worker does with one input (a turn). `echo` streams the input back;
//! `command` runs a program without a shell, input on stdin, stdout streamed as output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded, select};

use crate::runtime::types::TurnOutcome;

/// A named profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Its name, as chosen at create time.
    pub name: String,
    /// What it does.
    pub kind: ProfileKind,
}

/// The kinds of profile.
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileKind {
    /// Output = input, streamed in word-sized chunks at a steady pace of one per `delay`.
    Echo {
        /// One chunk per `delay`, paced from the start of the turn.
        delay: Duration,
    },
    /// Runs `argv` per input.
    Command {
        /// Program and arguments (no shell).
        argv: Vec<String>,
        /// Working directory.
        cwd: Option<PathBuf>,
        /// Extra environment.
        env: BTreeMap<String, String>,
        /// A turn running longer fails with `turn_timeout`.
        turn_timeout: Duration,
        /// More stdout (or stderr) than this fails with `output_too_large`.
        max_output_bytes: usize,
    },
}

impl Profile {
    /// An echo profile.
    pub fn echo(name: &str, delay: Duration) -> Profile {
        Profile { name: name.to_owned(), kind: ProfileKind::Echo { delay } }
    }
}

/// A request to end the running turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnSignal {
    /// Graceful: finish within the grace period, else end.
    Stop,
    /// Immediate.
    Cancel,
}

/// What a turn produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOutput {
    /// Everything emitted (stdout).
    pub text: String,
    /// stderr of a command.
    pub stderr: String,
    /// How it ended.
    pub outcome: TurnOutcome,
    /// `(code, message)` when it failed or was cut short.
    pub error: Option<(String, String)>,
}

impl TurnOutput {
    fn ended(text: String, stderr: String, end: End) -> TurnOutput {
        let (outcome, error) = match end {
            End::Completed => (TurnOutcome::Completed, None),
            End::Cancelled => (TurnOutcome::Cancelled, None),
            End::Failed(code, message) => (TurnOutcome::Failed, Some((code.to_owned(), message))),
        };
        TurnOutput { text, stderr, outcome, error }
    }
}

enum End {
    Completed,
    Cancelled,
    Failed(&'static str, String),
}

/// Tracks the signals and deadlines of one turn.
struct TurnControl<'a> {
    signals: &'a Receiver<TurnSignal>,
    grace: Duration,
    stop_at: Option<Instant>,
}

impl TurnControl<'_> {
    /// Applies a signal; returns the end it forces now, if any.
    fn apply(&mut self, signal: TurnSignal) -> Option<End> {
        match signal {
            TurnSignal::Cancel => Some(End::Cancelled),
            TurnSignal::Stop => {
                let at = Instant::now() + self.grace;
                self.stop_at = Some(self.stop_at.map_or(at, |s| s.min(at)));
                None
            }
        }
    }

    /// Waits up to `pause` for a signal or the stop deadline; returns the end it forces.
    fn pause(&mut self, pause: Duration) -> Option<End> {
        if pause.is_zero() {
            // No wait: a blocking receive would spin and yield before giving up.
            while let Ok(signal) = self.signals.try_recv() {
                if let Some(end) = self.apply(signal) {
                    return Some(end);
                }
            }
            return self.stop_at.is_some_and(|s| Instant::now() >= s).then_some(End::Cancelled);
        }
        let until = Instant::now() + pause;
        loop {
            let wake = self.stop_at.map_or(until, |s| s.min(until));
            match self.signals.recv_deadline(wake) {
                Ok(signal) => {
                    if let Some(end) = self.apply(signal) {
                        return Some(end);
                    }
                }
                Err(_) if self.stop_at.is_some_and(|s| Instant::now() >= s) => {
                    return Some(End::Cancelled);
                }
                Err(_) if Instant::now() >= until => return None,
                Err(_) => {}
            }
        }
    }
}

/// Runs one turn of `profile` on `input`, calling `emit` with each piece of output.
pub fn run_turn(
    profile: &Profile,
    input: &str,
    signals: &Receiver<TurnSignal>,
    grace: Duration,
    emit: &mut dyn FnMut(&str),
) -> TurnOutput {
    let mut control = TurnControl { signals, grace, stop_at: None };
    match &profile.kind {
        ProfileKind::Echo { delay } => run_echo(input, *delay, &mut control, emit),
        ProfileKind::Command { argv, cwd, env, turn_timeout, max_output_bytes } => {
            let spec = CommandSpec {
                argv,
                cwd: cwd.as_ref(),
                env,
                turn_timeout: *turn_timeout,
                max_output: *max_output_bytes,
            };
            run_command(&spec, input, &mut control, emit)
        }
    }
}

fn run_echo(input: &str, delay: Duration, control: &mut TurnControl<'_>, emit: &mut dyn FnMut(&str)) -> TurnOutput {
    let mut text = String::with_capacity(input.len());
    // Chunks keep a steady pace: one per `delay` from the start, however long emitting takes.
    let start = Instant::now();
    for (i, chunk) in input.split_inclusive(char::is_whitespace).enumerate() {
        let due = start + delay.saturating_mul(i as u32 + 1);
        if let Some(end) = control.pause(due.saturating_duration_since(Instant::now())) {
            return TurnOutput::ended(text, String::new(), end);
        }
        emit(chunk);
        text.push_str(chunk);
    }
    TurnOutput::ended(text, String::new(), End::Completed)
}

struct CommandSpec<'a> {
    argv: &'a [String],
    cwd: Option<&'a PathBuf>,
    env: &'a BTreeMap<String, String>,
    turn_timeout: Duration,
    max_output: usize,
}

fn run_command(
    spec: &CommandSpec<'_>,
    input: &str,
    control: &mut TurnControl<'_>,
    emit: &mut dyn FnMut(&str),
) -> TurnOutput {
    let program = &spec.argv[0];
    let mut command = Command::new(program);
    command.args(&spec.argv[1..]).envs(spec.env).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(cwd) = spec.cwd {
        command.current_dir(cwd);
    }
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of ours. It makes the kernel
    // kill the command when the thread that started it ends: this turn thread waits for the
    // command, so that happens only when the runtime dies (SIGKILL), and a restarted runtime
    // never has a predecessor's command still running beside the turn it closed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let end = End::Failed("spawn_failed", format!("cannot start `{program}`: {e}"));
            return TurnOutput::ended(String::new(), String::new(), end);
        }
    };
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    if let Some(mut stdin) = stdin {
        let bytes = input.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes); // the program may exit without reading: fine
        });
    }
    let (chunk_tx, chunks) = bounded::<Vec<u8>>(64);
    if let Some(mut stdout) = stdout {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if chunk_tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
    }
    let stderr_result = {
        let (tx, rx) = bounded::<String>(1);
        let cap = spec.max_output;
        if let Some(stderr) = stderr {
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let _ = stderr.take(cap as u64).read_to_end(&mut kept);
                let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
            });
        }
        rx
    };

    let timeout_at = Instant::now() + spec.turn_timeout;
    let mut text = String::new();
    let mut decoder = Utf8Stream::default();
    let mut output_len = 0usize;
    let end = loop {
        let deadline = control.stop_at.map_or(timeout_at, |s| s.min(timeout_at));
        select! {
            recv(chunks) -> chunk => match chunk {
                Ok(bytes) => {
                    output_len += bytes.len();
                    if output_len > spec.max_output {
                        break End::Failed("output_too_large", format!("`{program}` wrote more than {} bytes", spec.max_output));
                    }
                    let piece = decoder.push(&bytes);
                    if !piece.is_empty() {
                        emit(&piece);
                        text.push_str(&piece);
                    }
                }
                Err(_) => break wait_exit(&mut child, control, deadline, timeout_at, program),
            },
            recv(control.signals) -> signal => {
                if let Some(end) = signal.ok().and_then(|s| control.apply(s)) {
                    break end;
                }
            },
            default(deadline.saturating_duration_since(Instant::now())) => {
                break deadline_end(control, timeout_at, spec.turn_timeout, program);
            }
        }
    };
    kill_group(&mut child);
    let rest = decoder.finish();
    if !rest.is_empty() && matches!(end, End::Completed | End::Failed("exit_status", _)) {
        emit(&rest);
        text.push_str(&rest);
    }
    let stderr = stderr_result.recv_timeout(Duration::from_millis(200)).unwrap_or_default();
    TurnOutput::ended(text, stderr, end)
}

/// stdout is closed: wait for the exit status (the program may linger), honouring signals.
fn wait_exit(
    child: &mut Child,
    control: &mut TurnControl<'_>,
    deadline: Instant,
    timeout_at: Instant,
    program: &str,
) -> End {
    let mut deadline = deadline;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return End::Completed,
            Ok(Some(status)) => {
                return End::Failed("exit_status", format!("`{program}` exited with {status}"));
            }
            Ok(None) => {}
            Err(e) => {
                return End::Failed("wait_failed", format!("cannot wait for `{program}`: {e}"));
            }
        }
        if Instant::now() >= deadline {
            return deadline_end(control, timeout_at, Duration::ZERO, program);
        }
        if let Ok(signal) = control.signals.recv_timeout(Duration::from_millis(2)) {
            if let Some(end) = control.apply(signal) {
                return end;
            }
            deadline = control.stop_at.map_or(timeout_at, |s| s.min(timeout_at));
        }
    }
}

fn deadline_end(control: &TurnControl<'_>, timeout_at: Instant, timeout: Duration, program: &str) -> End {
    if control.stop_at.is_some_and(|s| s <= timeout_at) {
        End::Cancelled
    } else {
        End::Failed("turn_timeout", format!("`{program}` did not finish within {} ms", timeout.as_millis()))
    }
}

/// Kills the program and everything it started (its process group), then reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        #[cfg(unix)]
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signals the process group we created for this child; no memory involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Turns a byte stream into UTF-8 text without splitting characters across chunks.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(), // invalid bytes: replace them now
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(argv: &[&str], timeout_ms: u64) -> Profile {
        Profile {
            name: "cmd".into(),
            kind: ProfileKind::Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                cwd: None,
                env: BTreeMap::new(),
                turn_timeout: Duration::from_millis(timeout_ms),
                max_output_bytes: 1024,
            },
        }
    }

    fn run(profile: &Profile, input: &str) -> (TurnOutput, Vec<String>) {
        let (_tx, rx) = bounded(1);
        let mut pieces = Vec::new();
        let out = run_turn(profile, input, &rx, Duration::from_secs(1), &mut |s| pieces.push(s.to_owned()));
        (out, pieces)
    }

    #[test]
    fn echo_streams_words() {
        let (out, pieces) = run(&Profile::echo("echo", Duration::ZERO), "hello big world");
        assert_eq!(pieces, ["hello ", "big ", "world"]);
        assert_eq!(out.text, "hello big world");
        assert_eq!(out.outcome, TurnOutcome::Completed);
    }

    #[test]
    fn command_output_stderr_and_exit_status() {
        let (out, _) = run(&command(&["tr", "a-z", "A-Z"], 5000), "shout");
        assert_eq!((out.text.as_str(), out.outcome), ("SHOUT", TurnOutcome::Completed));
        let (out, _) = run(&command(&["sh", "-c", "echo oops >&2; exit 3"], 5000), "");
        assert_eq!(out.outcome, TurnOutcome::Failed);
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.error.unwrap().0, "exit_status");
    }

    #[test]
    fn command_limits() {
        let (out, _) = run(&command(&["sleep", "10"], 100), "");
        assert_eq!(out.error.unwrap().0, "turn_timeout");
        let (out, _) = run(&command(&["sh", "-c", "yes"], 5000), "");
        assert_eq!(out.error.unwrap().0, "output_too_large");
        let (out, _) = run(&command(&["/no/such/program"], 5000), "");
        assert_eq!(out.error.unwrap().0, "spawn_failed");
    }

    #[test]
    fn cancel_kills_the_process_group() {
        let (tx, rx) = bounded(1);
        tx.send(TurnSignal::Cancel).unwrap();
        let started = Instant::now();
        let out = run_turn(
            &command(&["sh", "-c", "sleep 30; echo late"], 60_000),
            "",
            &rx,
            Duration::from_secs(1),
            &mut |_| {},
        );
        assert_eq!(out.outcome, TurnOutcome::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn utf8_is_never_split() {
        let mut s = Utf8Stream::default();
        let bytes = "é".as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..]), "é");
    }
}
