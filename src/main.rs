//! `worker-gateway`: the command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use worker_gateway::config;
use worker_gateway::gateway::Gateway;

const USAGE: &str = "\
worker-gateway — one HTTP + WebSocket API over many worker runtimes

USAGE:
    worker-gateway serve [--config FILE] [--bind ADDR]
    worker-gateway --help | --version

COMMANDS:
    serve      run the gateway (default config: one embedded runtime `local`,
               fs store under ./data/local, bound to 127.0.0.1:8787)

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

/// Arguments of `serve`.
struct ServeArgs {
    config: Option<PathBuf>,
    bind: Option<SocketAddr>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    match parser.next()? {
        Some(Value(command)) if command == "serve" => serve(parse_serve(&mut parser)?),
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
    let mut args = ServeArgs {
        config: None,
        bind: None,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => args.config = Some(parser.value()?.into()),
            Long("bind") => {
                let value = parser.value()?.string()?;
                args.bind = Some(
                    value
                        .parse()
                        .with_context(|| format!("--bind `{value}` is not an IP:port address"))?,
                );
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
    let addr = gateway.addr();
    log::info!("worker-gateway listening on http://{addr}");
    // Scripts and tests read the bound address (useful with port 0) from this line.
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    let _ = signals.recv();
    log::info!("shutting down");
    gateway.shutdown();
    log::info!("stopped");
    Ok(())
}

/// A channel that receives once SIGINT or SIGTERM arrives.
fn shutdown_signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(());
            }
        })?;
    Ok(rx)
}
