//! `worker-gateway`: the command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use worker_gateway::config;
use worker_gateway::gateway::Gateway;
use worker_gateway::runtime::server::RuntimeServer;
use worker_gateway::tls::front::ServerTls;

const USAGE: &str = "\
worker-gateway — one HTTP + WebSocket API over many worker runtimes

USAGE:
    worker-gateway serve   [--config FILE] [--bind ADDR] [--tls-cert FILE --tls-key FILE]
    worker-gateway runtime [--config FILE] [--bind ADDR] [--runtime-id ID]
                           [--data-dir DIR | --memory] [--token-env VAR | --token-file PATH]
                           [--insecure-no-token] [--tls-cert FILE --tls-key FILE]
    worker-gateway check   [--config FILE] [--json]
    worker-gateway help [COMMAND] | version

COMMANDS:
    serve      run the gateway (without --config: one embedded runtime `local`,
               fs store in ./data/local, bound to 127.0.0.1:8787)
    runtime    serve one runtime over the Runtime API, for a gateway to reach
               (default: 127.0.0.1:38800, id `runtime`, fs store in ./data/<id>)
    check      smoke-test every configured runtime (create, input, transcript, stop,
               delete); exit status 1 when a check fails
    help       this help, or a command's (`worker-gateway help serve`)
    version    the version (also --version, -V)

Exit status: 0 success, 1 a check failed (`check`), 2 an error (bad usage or config,
cannot start). Logging: stderr, RUST_LOG (default `info`; `error` for check), e.g.
RUST_LOG=warn.
";

const SERVE_USAGE: &str = "\
worker-gateway serve — run the gateway

USAGE:
    worker-gateway serve [--config FILE] [--bind ADDR] [--tls-cert FILE --tls-key FILE]

OPTIONS:
    --config FILE   the gateway config (TOML); relative paths in it are relative to its
                    folder. Without --config: the copy of config/gateway.toml built into
                    this binary (no file is read): one embedded runtime `local` with its
                    fs store in ./data/local (under the current directory), bound to
                    127.0.0.1:8787.
    --bind ADDR     listen address, overrides [server] bind: IP:port or host:port
                    (127.0.0.1:0 picks a free port; localhost:8787 binds 127.0.0.1)
    --tls-cert FILE serve HTTPS/WSS with this PEM certificate chain (with --tls-key);
                    overrides [server] tls_cert_file
    --tls-key FILE  the PEM private key of --tls-cert; overrides [server] tls_key_file
    -h, --help      this help

It prints `listening on http://ADDR` once it serves, and stops on SIGINT or SIGTERM.
";

const RUNTIME_USAGE: &str = "\
worker-gateway runtime — serve one runtime over the Runtime API

USAGE:
    worker-gateway runtime [--config FILE] [--bind ADDR] [--runtime-id ID]
                           [--data-dir DIR | --memory] [--token-env VAR | --token-file PATH]
                           [--insecure-no-token] [--tls-cert FILE --tls-key FILE]

OPTIONS:
    --config FILE        runtime config (TOML: [server], [runtime], [profiles.*]); without
                         it, the defaults below. Flags override the file.
    --bind ADDR          listen address, IP:port or host:port (default 127.0.0.1:38800)
    --runtime-id ID      the runtime's id (default `runtime`)
    --data-dir DIR       fs store in DIR (default ./data/<id>)
    --memory             keep nothing on disk
    --token-env VAR      require the bearer token held in environment variable VAR
    --token-file PATH    require the bearer token held in file PATH
    --insecure-no-token  allow a non-loopback bind without a token
    --tls-cert FILE      serve HTTPS/WSS with this PEM certificate chain (with --tls-key)
    --tls-key FILE       the PEM private key of --tls-cert
    -h, --help           this help
";

const CHECK_USAGE: &str = "\
worker-gateway check — smoke-test every runtime of a gateway config

USAGE:
    worker-gateway check [--config FILE] [--json]

For each runtime: reachable, authenticated, Runtime API compatible, create an `echo`
worker, input round trip, transcript, stop, delete. A step that does not apply or was not
reached shows SKIP (a runtime without DELETE, a step after a failure); only FAIL fails.
Runtimes are checked in parallel, each on its own (one that fails does not stop the
others), within 30 s. Embedded runtimes are checked on a memory copy. The last line sums
up (`3 runtimes: 2 ok, 1 failed`). Exit status 0 when nothing failed, 1 when a check
failed, 2 on bad usage or config.

OPTIONS:
    --config FILE   gateway config (default: the copy of config/gateway.toml built into
                    this binary)
    --json          print one JSON object instead of a table
    -h, --help      this help
";

/// Arguments of `serve`.
struct ServeArgs {
    config: Option<PathBuf>,
    bind: Option<SocketAddr>,
    tls: TlsArgs,
}

/// `--tls-cert` and `--tls-key` of `serve` and `runtime`.
#[derive(Default)]
struct TlsArgs {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl TlsArgs {
    /// Overrides the config's files with the flags given; returns the URL scheme served.
    fn apply(self, server: &mut config::ServerConfig) -> &'static str {
        server.tls_cert_file = self.cert.or(server.tls_cert_file.take());
        server.tls_key_file = self.key.or(server.tls_key_file.take());
        if server.tls_cert_file.is_some() { "https" } else { "http" }
    }
}

/// Why `run` stopped: a usage or start error (exit status 2) is printed; a `check` that
/// found a failure (1) has printed its report.
enum Exit {
    Error(anyhow::Error),
    ChecksFailed,
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Exit {
        Exit::Error(e.into())
    }
}

fn main() -> ExitCode {
    return_large_allocations();
    fail_writes_past_the_file_size_limit();
    // `check` says what it found in its report; its log (the runtimes' health as its
    // probes see it) would only repeat that, so it logs errors only unless RUST_LOG says more.
    let check = std::env::args_os().nth(1).is_some_and(|command| command == "check");
    init_logging(if check { log::LevelFilter::Error } else { log::LevelFilter::Info });
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit::ChecksFailed) => ExitCode::from(1),
        Err(Exit::Error(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Has blocks of 1 MiB and more (a large event, its frames, a read buffer grown to hold it)
/// mapped apart, so they go back to the system when freed. glibc would raise that threshold
/// to the largest block freed so far and keep blocks up to 32 MiB in its heaps for good: each
/// worker that once carried a large event would cost that much for the life of the process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_allocations() {
    // SAFETY: sets an allocator parameter; called first thing, before any other thread.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_allocations() {}

/// A write past the file size limit (`ulimit -f`) fails as a full disk does, with an error
/// the journal handles, instead of killing the process (the default action of SIGXFSZ).
fn fail_writes_past_the_file_size_limit() {
    // SAFETY: sets a signal's disposition to "ignore"; no handler runs.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// `RUST_LOG` (default `level`). The HTTP client crates log request URLs (a remote's base
/// URL is backend-private), so they stay at `warn` unless `RUST_LOG` names them itself.
fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    for noisy in ["ureq", "ureq_proto", "rustls", "tungstenite"] {
        builder.filter_module(noisy, level.min(log::LevelFilter::Warn));
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    // env_logger's own timestamps need its `humantime` feature (two more crates).
    builder.format(|buf, record| {
        let now = worker_gateway::clock::now_rfc3339();
        writeln!(buf, "[{now} {:<5} {}] {}", record.level(), record.target(), record.args())
    });
    builder.init();
}

fn run() -> Result<(), Exit> {
    use lexopt::prelude::*;
    // Every connection costs tiny_http two descriptors, a WebSocket session one.
    if let Some(limit) = worker_gateway::http::sockets::raise_fd_limit() {
        log::debug!("open file limit: {limit}");
    }
    let mut parser = lexopt::Parser::from_env();
    let first = parser.next().map_err(|e| usage(e, ""))?;
    let command = match first {
        Some(Value(command)) => command.string().map_err(|e| usage(e, ""))?,
        Some(Long("help") | Short('h')) => return help(None),
        Some(Long("version") | Short('V')) => return version(),
        Some(other) => return Err(usage(other.unexpected(), "")),
        None => {
            eprintln!("{USAGE}");
            return Err(anyhow::anyhow!("no command given").into());
        }
    };
    match command.as_str() {
        "serve" => serve(&mut parser),
        "runtime" => runtime(&mut parser),
        "check" => check(&mut parser),
        "help" => {
            let topic = help_topic(&mut parser).map_err(|e| usage(e, ""))?;
            help(topic.as_deref())
        }
        "version" => {
            no_more(&mut parser).map_err(|e| usage(e, ""))?;
            version()
        }
        other => {
            Err(anyhow::anyhow!("unknown command `{other}`; the commands are serve, runtime, check, help, version")
                .into())
        }
    }
}

fn help(topic: Option<&str>) -> Result<(), Exit> {
    let text = match topic {
        None | Some("help" | "version") => USAGE,
        Some("serve") => SERVE_USAGE,
        Some("runtime") => RUNTIME_USAGE,
        Some("check") => CHECK_USAGE,
        Some(other) => {
            return Err(anyhow::anyhow!(
                "no help for `{other}`: the commands are serve, runtime, check, help, version"
            )
            .into());
        }
    };
    print_out(text)?;
    Ok(())
}

fn version() -> Result<(), Exit> {
    print_out(&format!("worker-gateway {}\n", env!("CARGO_PKG_VERSION")))?;
    Ok(())
}

/// `help [COMMAND]`'s command.
fn help_topic(parser: &mut lexopt::Parser) -> anyhow::Result<Option<String>> {
    use lexopt::prelude::*;
    let topic = match parser.next()? {
        Some(Value(topic)) => Some(topic.string()?),
        Some(other) => return Err(other.unexpected().into()),
        None => None,
    };
    no_more(parser)?;
    Ok(topic)
}

/// Fails on any argument left.
fn no_more(parser: &mut lexopt::Parser) -> anyhow::Result<()> {
    match parser.next()? {
        Some(arg) => Err(arg.unexpected().into()),
        None => Ok(()),
    }
}

/// A command-line error, with where to read about the command.
fn usage(error: impl Into<anyhow::Error>, command: &str) -> Exit {
    let help =
        if command.is_empty() { "worker-gateway help".to_owned() } else { format!("worker-gateway help {command}") };
    Exit::Error(anyhow::anyhow!("{:#}; see `{help}`", error.into()))
}

/// `--bind`'s value, resolved.
fn bind_value(parser: &mut lexopt::Parser) -> anyhow::Result<SocketAddr> {
    use lexopt::ValueExt;
    config::parse_bind(&parser.value()?.string()?).context("--bind")
}

/// Arguments of `serve`; `None` when `--help` was answered.
fn parse_serve(parser: &mut lexopt::Parser) -> anyhow::Result<Option<ServeArgs>> {
    use lexopt::prelude::*;
    let mut args = ServeArgs { config: None, bind: None, tls: TlsArgs::default() };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("tls-cert") => args.tls.cert = Some(parser.value()?.into()),
            Long("tls-key") => args.tls.key = Some(parser.value()?.into()),
            Long("bind") => args.bind = Some(bind_value(parser)?),
            Long("help") | Short('h') => {
                let _ = print_out(SERVE_USAGE);
                return Ok(None);
            }
            other => return Err(other.unexpected().into()),
        }
    }
    Ok(Some(args))
}

fn serve(parser: &mut lexopt::Parser) -> Result<(), Exit> {
    let Some(args) = parse_serve(parser).map_err(|e| usage(e, "serve"))? else {
        return Ok(());
    };
    let mut config = config::load_gateway(args.config.as_deref())?;
    if let Some(bind) = args.bind {
        config.server.bind = bind;
    }
    let scheme = args.tls.apply(&mut config.server);
    match &args.config {
        Some(path) => log::info!("config: {}", path.display()),
        None => log::info!("config: the built-in copy of config/gateway.toml (no --config given)"),
    }
    let signals = shutdown_signals()?;
    let gateway = Gateway::start(config)?;
    serve_until_signal(scheme, gateway.addr(), &signals)?;
    gateway.shutdown();
    log::info!("stopped");
    Ok(())
}

/// Arguments of `runtime`.
struct RuntimeArgs {
    config: Option<PathBuf>,
    overrides: config::RuntimeOverrides,
    insecure_no_token: bool,
    tls: TlsArgs,
}

/// Arguments of `runtime`; `None` when `--help` was answered.
fn parse_runtime(parser: &mut lexopt::Parser) -> anyhow::Result<Option<RuntimeArgs>> {
    use lexopt::prelude::*;
    let mut args =
        RuntimeArgs { config: None, overrides: Default::default(), insecure_no_token: false, tls: TlsArgs::default() };
    let overrides = &mut args.overrides;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("tls-cert") => args.tls.cert = Some(parser.value()?.into()),
            Long("tls-key") => args.tls.key = Some(parser.value()?.into()),
            Long("bind") => overrides.bind = Some(bind_value(parser)?),
            Long("runtime-id") => overrides.runtime_id = Some(parser.value()?.string()?),
            Long("data-dir") => overrides.data_dir = Some(parser.value()?.into()),
            Long("memory") => overrides.memory = true,
            Long("token-env") => overrides.token_env = Some(parser.value()?.string()?),
            Long("token-file") => overrides.token_file = Some(parser.value()?.into()),
            Long("insecure-no-token") => args.insecure_no_token = true,
            Long("help") | Short('h') => {
                let _ = print_out(RUNTIME_USAGE);
                return Ok(None);
            }
            other => return Err(other.unexpected().into()),
        }
    }
    Ok(Some(args))
}

fn runtime(parser: &mut lexopt::Parser) -> Result<(), Exit> {
    let Some(args) = parse_runtime(parser).map_err(|e| usage(e, "runtime"))? else {
        return Ok(());
    };
    let mut config = config::load_runtime(args.config.as_deref(), &args.overrides)?;
    let scheme = args.tls.apply(&mut config.server);
    let signals = shutdown_signals()?;
    let server = RuntimeServer::start(config, args.insecure_no_token)?;
    serve_until_signal(scheme, server.addr(), &signals)?;
    server.shutdown();
    log::info!("stopped");
    Ok(())
}

/// Arguments of `check` (config, `--json`); `None` when `--help` was answered.
fn parse_check(parser: &mut lexopt::Parser) -> anyhow::Result<Option<(Option<PathBuf>, bool)>> {
    use lexopt::prelude::*;
    let (mut path, mut json) = (None, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => path = Some(parser.value()?.into()),
            Long("json") => json = true,
            Long("help") | Short('h') => {
                let _ = print_out(CHECK_USAGE);
                return Ok(None);
            }
            other => return Err(other.unexpected().into()),
        }
    }
    Ok(Some((path, json)))
}

fn check(parser: &mut lexopt::Parser) -> Result<(), Exit> {
    let Some((path, json)) = parse_check(parser).map_err(|e| usage(e, "check"))? else {
        return Ok(());
    };
    let config = config::load_gateway_to_check(path.as_deref())
        .and_then(|config| {
            // A certificate and key `serve` would refuse at its start are refused here too.
            let server = &config.server;
            ServerTls::load(server.tls_cert_file.as_deref(), server.tls_key_file.as_deref())?;
            Ok(config)
        })
        .inspect_err(|e| {
            // A script reading the report reads why there is none.
            if json {
                let summary = serde_json::json!({"runtimes": 0, "ok": 0, "failed": 0});
                let report =
                    serde_json::json!({"ok": false, "error": format!("{e:#}"), "summary": summary, "runtimes": []});
                let _ = print_out(&format!("{report}\n"));
            }
        })?;
    let report = worker_gateway::check::run(&config);
    if json {
        print_out(&(serde_json::to_string(&report)? + "\n"))?;
    } else {
        print_out(&report.table())?;
    }
    if report.ok { Ok(()) } else { Err(Exit::ChecksFailed) }
}

/// Prints `text` on stdout, flushed. A reader that stopped early (`… | head`) is no error:
/// the rest is not wanted (`println!` panicked on the closed pipe).
fn print_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
}

/// Announces the address, then blocks until SIGINT/SIGTERM.
fn serve_until_signal(scheme: &str, addr: SocketAddr, signals: &crossbeam_channel::Receiver<()>) -> anyhow::Result<()> {
    log::info!("worker-gateway listening on {scheme}://{addr}");
    // Scripts and tests read the bound address (useful with port 0) from this line.
    print_out(&format!("listening on {scheme}://{addr}\n"))?;
    let _ = signals.recv();
    log::info!("shutting down");
    Ok(())
}

/// A channel that receives once SIGINT or SIGTERM arrives. A second one ends the process at
/// once (exit 1), without waiting for requests and turns: what was acknowledged is already
/// on disk, as after a `kill -9`.
fn shutdown_signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut received = signals.forever();
        if received.next().is_some() {
            let _ = tx.send(());
        }
        if received.next().is_some() {
            log::warn!("a second signal: exiting now, without waiting for requests and turns to end");
            std::process::exit(1);
        }
    })?;
    Ok(rx)
}
