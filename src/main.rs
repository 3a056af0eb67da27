//! `worker-gateway`: the command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use worker_gateway::config;
use worker_gateway::gateway::Gateway;
use worker_gateway::runtime::server::RuntimeServer;

const USAGE: &str = "\
worker-gateway — one HTTP + WebSocket API over many worker runtimes

USAGE:
    worker-gateway serve   [--config FILE] [--bind ADDR]
    worker-gateway runtime [--config FILE] [--bind ADDR] [--runtime-id ID]
                           [--data-dir DIR | --memory] [--token-env VAR | --token-file PATH]
    worker-gateway check   [--config FILE] [--json]
    worker-gateway --help | --version

COMMANDS:
    serve      run the gateway (default config: one embedded runtime `local`,
               fs store under ./data/local, bound to 127.0.0.1:8787)
    runtime    serve one runtime over the Runtime API, for a gateway to reach
               (default: 127.0.0.1:38800, id `runtime`, fs store under ./data/<id>)
    check      smoke-test every configured runtime (create, input, transcript, stop,
               delete); exits non-zero when a check fails

Run `worker-gateway COMMAND --help` for a command's options.

Logging: RUST_LOG (default `info`), e.g. RUST_LOG=warn or RUST_LOG=access=off.
";

const SERVE_USAGE: &str = "\
worker-gateway serve — run the gateway

USAGE:
    worker-gateway serve [--config FILE] [--bind ADDR]

OPTIONS:
    --config FILE   gateway config (TOML); default: the shipped config/gateway.toml
    --bind ADDR     listen address, overrides [server] bind (e.g. 127.0.0.1:0)
    -h, --help      this help
";

const RUNTIME_USAGE: &str = "\
worker-gateway runtime — serve one runtime over the Runtime API

USAGE:
    worker-gateway runtime [--config FILE] [--bind ADDR] [--runtime-id ID]
                           [--data-dir DIR | --memory] [--token-env VAR | --token-file PATH]
                           [--insecure-no-token]

OPTIONS:
    --config FILE        runtime config (TOML: [server], [runtime], [profiles.*])
    --bind ADDR          listen address (default 127.0.0.1:38800)
    --runtime-id ID      the runtime's id (default `runtime`)
    --data-dir DIR       fs store in DIR (default ./data/<id>)
    --memory             keep nothing on disk
    --token-env VAR      require the bearer token held in environment variable VAR
    --token-file PATH    require the bearer token held in file PATH
    --insecure-no-token  allow a non-loopback bind without a token
    -h, --help           this help
";

const CHECK_USAGE: &str = "\
worker-gateway check — smoke-test every runtime of a gateway config

USAGE:
    worker-gateway check [--config FILE] [--json]

For each runtime: reachable, authenticated, Runtime API compatible, create an `echo`
worker, input round trip, transcript, stop, delete (SKIP, not a failure, on a runtime
without DELETE). Embedded runtimes are checked on a memory copy. Exit status 0 when no
check failed, 1 when one failed, 2 on bad usage.

OPTIONS:
    --config FILE   gateway config (default: the shipped config/gateway.toml)
    --json          print JSON instead of a table
    -h, --help      this help
";

/// Arguments of `serve`.
struct ServeArgs {
    config: Option<PathBuf>,
    bind: Option<SocketAddr>,
}

fn main() -> ExitCode {
    init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `RUST_LOG` (default `info`). The HTTP client crates log request URLs (a remote's base
/// URL is backend-private), so they stay at `warn` unless `RUST_LOG` names them itself.
fn init_logging() {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    for noisy in ["ureq", "ureq_proto", "rustls", "tungstenite"] {
        builder.filter_module(noisy, log::LevelFilter::Warn);
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    builder.init();
}

fn run() -> anyhow::Result<()> {
    use lexopt::prelude::*;
    // Every connection costs tiny_http two descriptors, a WebSocket session one.
    if let Some(limit) = worker_gateway::http::sockets::raise_fd_limit() {
        log::debug!("open file limit: {limit}");
    }
    let mut parser = lexopt::Parser::from_env();
    match parser.next()? {
        Some(Value(command)) if command == "serve" => serve(parse_serve(&mut parser)?),
        Some(Value(command)) if command == "runtime" => runtime(&mut parser),
        Some(Value(command)) if command == "check" => check(&mut parser),
        Some(Long("help") | Short('h')) | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(Long("version") | Short('V')) => {
            println!("worker-gateway {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some(Value(other)) => {
            anyhow::bail!("unknown command `{}`; see --help", other.to_string_lossy())
        }
        Some(other) => Err(other.unexpected().into()),
    }
}

fn parse_serve(parser: &mut lexopt::Parser) -> anyhow::Result<ServeArgs> {
    use lexopt::prelude::*;
    let mut args = ServeArgs { config: None, bind: None };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("bind") => {
                let value = parser.value()?.string()?;
                args.bind = Some(value.parse().with_context(|| format!("--bind `{value}` is not an IP:port address"))?);
            }
            Long("help") | Short('h') => {
                print!("{SERVE_USAGE}");
                std::process::exit(0);
            }
            other => return Err(other.unexpected().into()),
        }
    }
    Ok(args)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = config::load_gateway(args.config.as_deref())?;
    if let Some(bind) = args.bind {
        config.server.bind = bind;
    }
    let signals = shutdown_signals()?;
    let gateway = Gateway::start(config)?;
    serve_until_signal(gateway.addr(), &signals)?;
    gateway.shutdown();
    log::info!("stopped");
    Ok(())
}

fn runtime(parser: &mut lexopt::Parser) -> anyhow::Result<()> {
    use lexopt::prelude::*;
    let mut path: Option<PathBuf> = None;
    let mut overrides = config::RuntimeOverrides::default();
    let mut insecure_no_token = false;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => path = Some(parser.value()?.into()),
            Long("bind") => {
                let value = parser.value()?.string()?;
                overrides.bind =
                    Some(value.parse().with_context(|| format!("--bind `{value}` is not an IP:port address"))?);
            }
            Long("runtime-id") => overrides.runtime_id = Some(parser.value()?.string()?),
            Long("data-dir") => overrides.data_dir = Some(parser.value()?.into()),
            Long("memory") => overrides.memory = true,
            Long("token-env") => overrides.token_env = Some(parser.value()?.string()?),
            Long("token-file") => overrides.token_file = Some(parser.value()?.into()),
            Long("insecure-no-token") => insecure_no_token = true,
            Long("help") | Short('h') => {
                print!("{RUNTIME_USAGE}");
                return Ok(());
            }
            other => return Err(other.unexpected().into()),
        }
    }
    let config = config::load_runtime(path.as_deref(), &overrides)?;
    let signals = shutdown_signals()?;
    let server = RuntimeServer::start(config, insecure_no_token)?;
    serve_until_signal(server.addr(), &signals)?;
    server.shutdown();
    log::info!("stopped");
    Ok(())
}

fn check(parser: &mut lexopt::Parser) -> anyhow::Result<()> {
    use lexopt::prelude::*;
    let (mut path, mut json): (Option<PathBuf>, bool) = (None, false);
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => path = Some(parser.value()?.into()),
            Long("json") => json = true,
            Long("help") | Short('h') => {
                print!("{CHECK_USAGE}");
                return Ok(());
            }
            other => return Err(other.unexpected().into()),
        }
    }
    let config = config::load_gateway(path.as_deref())?;
    let reports = worker_gateway::check::run(&config);
    let ok = reports.iter().all(|r| r.ok());
    if json {
        println!("{}", serde_json::json!({"ok": ok, "runtimes": reports}));
    } else {
        print!("{}", worker_gateway::check::table(&reports));
    }
    std::io::stdout().flush()?;
    std::process::exit(if ok { 0 } else { 1 });
}

/// Announces the address, then blocks until SIGINT/SIGTERM.
fn serve_until_signal(addr: SocketAddr, signals: &crossbeam_channel::Receiver<()>) -> anyhow::Result<()> {
    log::info!("worker-gateway listening on http://{addr}");
    // Scripts and tests read the bound address (useful with port 0) from this line.
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    let _ = signals.recv();
    log::info!("shutting down");
    Ok(())
}

/// A channel that receives once SIGINT or SIGTERM arrives.
fn shutdown_signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(());
        }
    })?;
    Ok(rx)
}
