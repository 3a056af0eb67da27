//! TOML configuration → validated settings.
//!
//! The file format is the contract of architecture.md: `[server]`, `[[runtimes]]`,
//! `[profiles.*]` (gateway) and `[server]`, `[runtime]`, `[profiles.*]` (runtime process).
//! Unknown keys and invalid values are rejected with a message naming the key. Tokens are
//! never in the file: only the environment variable or file that holds them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

use crate::gateway::relay::RelayOptions;
use crate::http::router::valid_id;
use crate::runtime::engine::{EngineOptions, Profile, ProfileKind, StoreKind};
use crate::runtime::remote::RemoteOptions;
use crate::secret::Secret;

/// The shipped default configuration, used by `serve` without `--config`.
pub const DEFAULT_GATEWAY_TOML: &str = include_str!("../config/gateway.toml");

/// Settings of the HTTP server shared by `serve` and `runtime`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Request handler threads at most (they start with load and end when idle).
    pub threads: usize,
    /// Bounded request queue between the acceptor and the pool.
    pub queue: usize,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Bytes of large responses held for clients still reading them; past it, 503.
    pub max_pending_response_bytes: usize,
    /// Cap on concurrent WebSocket sessions.
    pub max_ws_sessions: usize,
    /// Optional bearer token required on `/api/*` (gateway) or every route (runtime).
    pub token: Option<Secret>,
    /// Extra `Origin`s allowed on WebSocket upgrades.
    pub allowed_origins: Vec<String>,
    /// Extra host names accepted in the `Host` header.
    pub allowed_hosts: Vec<String>,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Event relays: ring sizes, subscriber queues, slow-consumer limit.
    pub relay: RelayOptions,
}

/// A validated gateway configuration (`worker-gateway serve`).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// HTTP server settings.
    pub server: ServerConfig,
    /// The runtimes the gateway routes to, in configuration order.
    pub runtimes: Vec<RuntimeConfig>,
}

/// One configured runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The `runtime_id` browsers address it by.
    pub id: String,
    /// Human-readable label.
    pub label: String,
    /// Where it lives.
    pub kind: RuntimeKindConfig,
}

/// An embedded engine or a remote runtime process.
#[derive(Debug, Clone)]
pub enum RuntimeKindConfig {
    /// Inside the gateway.
    Embedded(EngineOptions),
    /// Over the Runtime API.
    Remote(RemoteOptions),
}

/// A validated runtime-process configuration (`worker-gateway runtime`).
#[derive(Debug, Clone)]
pub struct RuntimeServerConfig {
    /// HTTP server settings.
    pub server: ServerConfig,
    /// The engine it serves.
    pub engine: EngineOptions,
    /// The token every request must carry (`None`: no check).
    pub token: Option<Secret>,
}

/// Command-line overrides of `worker-gateway runtime`.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOverrides {
    /// `--bind`.
    pub bind: Option<SocketAddr>,
    /// `--runtime-id`.
    pub runtime_id: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--memory`.
    pub memory: bool,
    /// `--token-env`.
    pub token_env: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: Option<String>,
    threads: Option<usize>,
    queue: Option<usize>,
    max_body_bytes: Option<u64>,
    max_pending_response_bytes: Option<usize>,
    max_ws_sessions: Option<usize>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    shutdown_grace_ms: Option<u64>,
    event_ring: Option<usize>,
    event_ring_bytes: Option<usize>,
    subscriber_queue: Option<usize>,
    slow_consumer_limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    runtimes: Vec<RawRuntime>,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    id: String,
    kind: String,
    label: Option<String>,
    #[serde(flatten)]
    engine: RawEngine,
    #[serde(flatten)]
    remote: RawRemote,
}

/// Keys of an embedded runtime (and of a runtime process's `[runtime]`).
#[derive(Deserialize, Default)]
struct RawEngine {
    store: Option<String>,
    data_dir: Option<PathBuf>,
    stop_grace_ms: Option<u64>,
    input_queue: Option<usize>,
    retained_events: Option<usize>,
}

/// Keys of a remote runtime.
#[derive(Deserialize, Default)]
struct RawRemote {
    base_url: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    probe_timeout_ms: Option<u64>,
    probe_interval_ms: Option<u64>,
    event_silence_ms: Option<u64>,
    max_in_flight: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntimeFile {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    runtime: RawRuntimeSection,
    #[serde(default)]
    profiles: BTreeMap<String, RawProfile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntimeSection {
    id: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    store: Option<String>,
    data_dir: Option<PathBuf>,
    stop_grace_ms: Option<u64>,
    input_queue: Option<usize>,
    retained_events: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    kind: String,
    delay_ms: Option<u64>,
    argv: Option<Vec<String>>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    turn_timeout_ms: Option<u64>,
    max_output_bytes: Option<usize>,
}

/// Default number of request handler threads: 2 × cores, at least 4.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).max(4)
}

/// The default cap of the request pool grows with the remotes' `max_in_flight` up to this
/// (beyond it, still larger than the largest one): threads start only under load, so the
/// cap bounds a burst, not what an idle gateway costs.
const DEFAULT_THREADS_CEILING: usize = 1024;

/// Loads the gateway configuration from `path`, or the shipped default when `None`.
///
/// Relative paths in the file are relative to the file's folder; the built-in default
/// behaves as if it were `./config/gateway.toml`.
pub fn load_gateway(path: Option<&Path>) -> anyhow::Result<GatewayConfig> {
    let (text, base) = read_config(path)?;
    let raw: RawGateway = toml::from_str(&text).map_err(|e| config_error(path, e))?;
    let profiles = validate_profiles(raw.profiles, &base)?;
    ensure!(!raw.runtimes.is_empty(), "config: at least one [[runtimes]] entry is required");
    let mut runtimes = Vec::with_capacity(raw.runtimes.len());
    for (index, rt) in raw.runtimes.into_iter().enumerate() {
        let runtime =
            rt.validate(&profiles, &base).with_context(|| format!("config: [[runtimes]] entry {}", index + 1))?;
        ensure!(
            runtimes.iter().all(|r: &RuntimeConfig| r.id != runtime.id),
            "config: runtimes.id `{}` is used twice",
            runtime.id
        );
        runtimes.push(runtime);
    }
    let remote_caps: Vec<usize> = runtimes
        .iter()
        .filter_map(|r| match &r.kind {
            RuntimeKindConfig::Remote(remote) => Some(remote.max_in_flight),
            RuntimeKindConfig::Embedded(_) => None,
        })
        .collect();
    let server = raw.server.validate(&base, &remote_caps)?;
    Ok(GatewayConfig { server, runtimes })
}

/// Loads a runtime process's configuration (`[server]`, `[runtime]`, `[profiles.*]`) from
/// `path` (or defaults), then applies the command-line `overrides`.
///
/// Defaults: bind `127.0.0.1:38800`, id `runtime`, fs store in `./data/<id>`.
pub fn load_runtime(path: Option<&Path>, overrides: &RuntimeOverrides) -> anyhow::Result<RuntimeServerConfig> {
    let (text, base) = match path {
        Some(_) => read_config(path)?,
        None => (String::new(), PathBuf::new()),
    };
    let mut raw: RawRuntimeFile = toml::from_str(&text).map_err(|e| config_error(path, e))?;
    ensure!(
        raw.server.token_env.is_none() && raw.server.token_file.is_none(),
        "config: a runtime's token goes in [runtime] token_env / token_file, not [server]"
    );
    raw.server.bind = raw.server.bind.or_else(|| Some("127.0.0.1:38800".to_owned()));
    let mut server = raw.server.validate(&base, &[])?;
    if let Some(bind) = overrides.bind {
        server.bind = bind;
    }
    let section = raw.runtime;
    let id = overrides.runtime_id.clone().or(section.id).unwrap_or_else(|| "runtime".to_owned());
    ensure!(valid_id(&id), "runtime id `{id}` must match [A-Za-z0-9_:.-]{{1,120}}");
    let (store, data_dir, cli_base) = match (overrides.memory, &overrides.data_dir) {
        (true, Some(_)) => bail!("--memory and --data-dir exclude each other"),
        (true, None) => (Some("memory"), None, None),
        (false, Some(dir)) => (Some("fs"), Some(dir.clone()), Some(PathBuf::new())),
        (false, None) => {
            let dir = section.data_dir.clone().or_else(|| (path.is_none()).then(|| PathBuf::from("data").join(&id)));
            (section.store.as_deref(), dir, None)
        }
    };
    let engine_keys = RawEngine {
        store: store.map(str::to_owned),
        data_dir,
        stop_grace_ms: section.stop_grace_ms,
        input_queue: section.input_queue,
        retained_events: section.retained_events,
    };
    let profiles = validate_profiles(raw.profiles, &base)?;
    let engine = engine_keys.validate(&id, &profiles, cli_base.as_deref().unwrap_or(&base), "runtime")?;
    let token = match (&overrides.token_env, &overrides.token_file) {
        (None, None) => load_token(section.token_env.as_deref(), section.token_file.as_deref(), &base, "runtime")?,
        (env, file) => load_token(env.as_deref(), file.as_deref(), Path::new(""), "--token")?,
    };
    Ok(RuntimeServerConfig { server, engine, token })
}

fn read_config(path: Option<&Path>) -> anyhow::Result<(String, PathBuf)> {
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("cannot read config file {}", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            Ok((text, base))
        }
        None => Ok((DEFAULT_GATEWAY_TOML.to_owned(), PathBuf::from("config"))),
    }
}

fn config_error(path: Option<&Path>, e: toml::de::Error) -> anyhow::Error {
    let name = path.map_or("built-in default config".to_owned(), |p| p.display().to_string());
    anyhow::anyhow!("invalid config {name}: {e}")
}

/// Joins `rel` onto `base` and removes `.`/`..` lexically (the folders need not exist).
fn resolve(base: &Path, rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in base.join(rel).components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

impl RawServer {
    /// Validates `[server]`. The pool must outlast any one remote runtime: by default its cap
    /// is 2 × cores (at least 4) plus each remote's `max_in_flight` (at most 1024, and always
    /// more than the largest), and an explicit `threads` must exceed every remote's
    /// `max_in_flight`.
    fn validate(self, base: &Path, remote_caps: &[usize]) -> anyhow::Result<ServerConfig> {
        let bind_text = self.bind.unwrap_or_else(|| "127.0.0.1:8787".to_owned());
        let bind = bind_text
            .parse()
            .map_err(|_| anyhow::anyhow!("config: server.bind `{bind_text}` is not an IP:port address"))?;
        let threads = self.threads.unwrap_or_else(|| {
            let largest = remote_caps.iter().max().map_or(0, |cap| default_threads() + cap);
            (default_threads() + remote_caps.iter().sum::<usize>()).min(DEFAULT_THREADS_CEILING).max(largest)
        });
        ensure!((1..=4096).contains(&threads), "config: server.threads must be 1..=4096");
        if let Some(cap) = remote_caps.iter().max().filter(|cap| threads <= **cap) {
            bail!(
                "config: server.threads ({threads}) must be larger than every remote runtime's max_in_flight ({cap}), \
                 or one hung runtime could hold the whole pool; raise threads or lower max_in_flight"
            );
        }
        let queue = self.queue.unwrap_or(256);
        ensure!((1..=65_536).contains(&queue), "config: server.queue must be 1..=65536");
        let max_body_bytes = self.max_body_bytes.unwrap_or(1 << 20);
        ensure!(max_body_bytes >= 1, "config: server.max_body_bytes must be at least 1");
        let max_pending_response_bytes = self.max_pending_response_bytes.unwrap_or(64 << 20);
        ensure!(max_pending_response_bytes >= 1, "config: server.max_pending_response_bytes must be at least 1");
        let max_ws_sessions = self.max_ws_sessions.unwrap_or(16_384);
        let token = load_token(self.token_env.as_deref(), self.token_file.as_deref(), base, "server")?;
        Ok(ServerConfig {
            bind,
            threads,
            queue,
            max_body_bytes,
            max_pending_response_bytes,
            max_ws_sessions,
            token,
            allowed_origins: self.allowed_origins,
            allowed_hosts: self.allowed_hosts,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms.unwrap_or(10_000)),
            relay: relay_options(
                self.event_ring,
                self.event_ring_bytes,
                self.subscriber_queue,
                self.slow_consumer_limit,
            )?,
        })
    }
}

fn relay_options(
    ring: Option<usize>,
    ring_bytes: Option<usize>,
    queue: Option<usize>,
    lag_limit: Option<u64>,
) -> anyhow::Result<RelayOptions> {
    let defaults = RelayOptions::default();
    let options = RelayOptions {
        ring_events: ring.unwrap_or(defaults.ring_events),
        ring_bytes: ring_bytes.unwrap_or(defaults.ring_bytes),
        queue: queue.unwrap_or(defaults.queue),
        lag_limit: lag_limit.unwrap_or(defaults.lag_limit),
        ..defaults
    };
    ensure!(
        options.ring_events >= 1 && options.ring_bytes >= 1,
        "config: server.event_ring and event_ring_bytes must be at least 1"
    );
    ensure!(
        options.queue >= 1 && options.lag_limit >= 1,
        "config: server.subscriber_queue and slow_consumer_limit must be at least 1"
    );
    Ok(options)
}

/// Loads a token named by `token_env` or `token_file` (never both).
pub fn load_token(
    env: Option<&str>,
    file: Option<&Path>,
    base: &Path,
    section: &str,
) -> anyhow::Result<Option<Secret>> {
    match (env, file) {
        (Some(_), Some(_)) => bail!("config: {section}: set token_env or token_file, not both"),
        (Some(var), None) => Secret::from_env(var).map(Some).with_context(|| format!("config: {section}.token_env")),
        (None, Some(path)) => {
            Secret::from_file(&resolve(base, path)).map(Some).with_context(|| format!("config: {section}.token_file"))
        }
        (None, None) => Ok(None),
    }
}

impl RawRuntime {
    fn validate(self, profiles: &BTreeMap<String, Profile>, base: &Path) -> anyhow::Result<RuntimeConfig> {
        ensure!(valid_id(&self.id), "runtimes.id `{}` must match [A-Za-z0-9_:.-]{{1,120}}", self.id);
        let kind = match self.kind.as_str() {
            "embedded" => {
                self.remote.ensure_unset()?;
                RuntimeKindConfig::Embedded(self.engine.validate(&self.id, profiles, base, "runtimes")?)
            }
            "remote" => {
                self.engine.ensure_unset()?;
                RuntimeKindConfig::Remote(self.remote.validate(&self.id, base)?)
            }
            other => bail!("runtimes.kind `{other}` is not one of \"embedded\", \"remote\""),
        };
        Ok(RuntimeConfig { label: self.label.unwrap_or_else(|| self.id.clone()), id: self.id, kind })
    }
}

impl RawEngine {
    fn validate(
        self,
        id: &str,
        profiles: &BTreeMap<String, Profile>,
        base: &Path,
        section: &str,
    ) -> anyhow::Result<EngineOptions> {
        let store = parse_store(self.store.as_deref(), self.data_dir.as_deref(), base, section)?;
        let mut engine = EngineOptions::new(id, store, profiles.clone());
        if let Some(ms) = self.stop_grace_ms {
            engine.stop_grace = Duration::from_millis(ms);
        }
        if let Some(n) = self.input_queue {
            ensure!(n >= 1, "{section}.input_queue must be at least 1");
            engine.input_queue = n;
        }
        if let Some(n) = self.retained_events {
            ensure!(n >= 1, "{section}.retained_events must be at least 1");
            engine.event_ring = n;
        }
        Ok(engine)
    }

    fn ensure_unset(&self) -> anyhow::Result<()> {
        let set = [
            ("store", self.store.is_some()),
            ("data_dir", self.data_dir.is_some()),
            ("stop_grace_ms", self.stop_grace_ms.is_some()),
            ("input_queue", self.input_queue.is_some()),
            ("retained_events", self.retained_events.is_some()),
        ];
        only_for(&set, "embedded")
    }
}

/// Fails naming the first key in `set` that is present: it belongs to `kind` only.
fn only_for(set: &[(&str, bool)], kind: &str) -> anyhow::Result<()> {
    match set.iter().find(|(_, present)| *present) {
        Some((key, _)) => bail!("runtimes.{key} is only valid for kind = \"{kind}\""),
        None => Ok(()),
    }
}

impl RawRemote {
    fn validate(self, id: &str, base: &Path) -> anyhow::Result<RemoteOptions> {
        let url = self.base_url.context("runtimes.base_url is required for kind = \"remote\"")?;
        let base_url = validate_base_url(&url)?;
        let token = load_token(self.token_env.as_deref(), self.token_file.as_deref(), base, "runtimes")?;
        let ms = |value: Option<u64>, default: u64, key: &str| -> anyhow::Result<Duration> {
            let v = value.unwrap_or(default);
            ensure!((1..=3_600_000).contains(&v), "runtimes.{key} must be 1..=3600000 (ms)");
            Ok(Duration::from_millis(v))
        };
        let request_ms = self.request_timeout_ms.unwrap_or(10_000);
        ms(Some(request_ms), request_ms, "request_timeout_ms")?;
        let max_in_flight = self.max_in_flight.unwrap_or(32);
        ensure!((1..=4096).contains(&max_in_flight), "runtimes.max_in_flight must be 1..=4096");
        Ok(RemoteOptions {
            runtime_id: id.to_owned(),
            base_url,
            token,
            connect_timeout: ms(self.connect_timeout_ms, 2_000, "connect_timeout_ms")?,
            read_timeout: ms(self.read_timeout_ms, request_ms, "read_timeout_ms")?,
            write_timeout: ms(self.write_timeout_ms, request_ms, "write_timeout_ms")?,
            probe_timeout: ms(self.probe_timeout_ms, 2_000, "probe_timeout_ms")?,
            probe_interval: ms(self.probe_interval_ms, 5_000, "probe_interval_ms")?,
            event_silence: ms(self.event_silence_ms, 60_000, "event_silence_ms")?,
            max_in_flight,
        })
    }

    fn ensure_unset(&self) -> anyhow::Result<()> {
        let set = [
            ("base_url", self.base_url.is_some()),
            ("token_env", self.token_env.is_some()),
            ("token_file", self.token_file.is_some()),
            ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
            ("request_timeout_ms", self.request_timeout_ms.is_some()),
            ("read_timeout_ms", self.read_timeout_ms.is_some()),
            ("write_timeout_ms", self.write_timeout_ms.is_some()),
            ("probe_timeout_ms", self.probe_timeout_ms.is_some()),
            ("probe_interval_ms", self.probe_interval_ms.is_some()),
            ("event_silence_ms", self.event_silence_ms.is_some()),
            ("max_in_flight", self.max_in_flight.is_some()),
        ];
        only_for(&set, "remote")
    }
}

/// `http(s)://host[:port][/prefix]`, without query, fragment or credentials; no trailing `/`.
/// Errors never repeat the URL (it is backend-private).
fn validate_base_url(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .context("runtimes.base_url must start with http:// or https://")?;
    let authority = rest.split('/').next().unwrap_or("");
    ensure!(!authority.is_empty(), "runtimes.base_url has no host");
    ensure!(!authority.contains('@'), "runtimes.base_url must not carry credentials; use token_env or token_file");
    ensure!(
        !url.contains(['?', '#']) && !url.contains(char::is_whitespace),
        "runtimes.base_url must not have a query, fragment or spaces"
    );
    Ok(url.trim_end_matches('/').to_owned())
}

/// Parses `store` (`fs` | `memory`, default `fs`) and its `data_dir`.
pub fn parse_store(
    store: Option<&str>,
    data_dir: Option<&Path>,
    base: &Path,
    section: &str,
) -> anyhow::Result<StoreKind> {
    match store.unwrap_or("fs") {
        "memory" => {
            ensure!(data_dir.is_none(), "config: {section}.data_dir is only valid with store = \"fs\"");
            Ok(StoreKind::Memory)
        }
        "fs" => {
            let dir =
                data_dir.with_context(|| format!("config: {section}.data_dir is required with store = \"fs\""))?;
            Ok(StoreKind::Fs(resolve(base, dir)))
        }
        other => bail!("config: {section}.store `{other}` is not one of \"fs\", \"memory\""),
    }
}

/// Validates `[profiles.*]`; the built-in `echo` profile exists even when not configured.
fn validate_profiles(raw: BTreeMap<String, RawProfile>, base: &Path) -> anyhow::Result<BTreeMap<String, Profile>> {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    for (name, p) in raw {
        let profile = p.validate(&name, base).with_context(|| format!("config: [profiles.{name}]"))?;
        profiles.insert(name, profile);
    }
    Ok(profiles)
}

impl RawProfile {
    fn validate(self, name: &str, base: &Path) -> anyhow::Result<Profile> {
        ensure!(valid_id(name), "profile name `{name}` must match [A-Za-z0-9_:.-]{{1,120}}");
        let command_only = self.argv.is_some()
            || self.cwd.is_some()
            || !self.env.is_empty()
            || self.turn_timeout_ms.is_some()
            || self.max_output_bytes.is_some();
        match self.kind.as_str() {
            "echo" => {
                ensure!(
                    !command_only,
                    "argv, cwd, env, turn_timeout_ms and max_output_bytes are only valid for kind = \"command\""
                );
                Ok(Profile::echo(name, Duration::from_millis(self.delay_ms.unwrap_or(0))))
            }
            "command" => {
                ensure!(self.delay_ms.is_none(), "delay_ms is only valid for kind = \"echo\"");
                let argv = self.argv.context("argv is required for kind = \"command\"")?;
                ensure!(!argv.is_empty() && !argv[0].is_empty(), "argv must name a program");
                let timeout_ms = self.turn_timeout_ms.unwrap_or(30_000);
                ensure!(timeout_ms >= 1, "turn_timeout_ms must be at least 1");
                Ok(Profile {
                    name: name.to_owned(),
                    kind: ProfileKind::Command {
                        argv,
                        cwd: self.cwd.map(|c| resolve(base, &c)),
                        env: self.env,
                        turn_timeout: Duration::from_millis(timeout_ms),
                        max_output_bytes: self.max_output_bytes.unwrap_or(1 << 20),
                    },
                })
            }
            other => bail!("kind `{other}` is not one of \"echo\", \"command\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<GatewayConfig> {
        let dir = std::env::temp_dir().join(format!("wg-config-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("gateway.toml");
        std::fs::write(&path, text)?;
        load_gateway(Some(&path))
    }

    #[test]
    fn builtin_default_is_one_embedded_fs_runtime_under_data_local() {
        let cfg = load_gateway(None).expect("default config parses");
        assert_eq!(cfg.server.bind.to_string(), "127.0.0.1:8787");
        assert_eq!(cfg.runtimes.len(), 1);
        assert_eq!(cfg.runtimes[0].id, "local");
        match &cfg.runtimes[0].kind {
            RuntimeKindConfig::Embedded(engine) => {
                assert_eq!(engine.store, StoreKind::Fs(PathBuf::from("data/local")))
            }
            RuntimeKindConfig::Remote(_) => panic!("the default runtime is embedded"),
        }
    }

    #[test]
    fn remote_runtimes_and_the_pool_rule() {
        let remote =
            "[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://10.1.2.3:38800/\"\nmax_in_flight=16\n";
        let cfg = parse(remote).expect("remote config parses");
        assert!(cfg.server.threads > 16, "the default pool outlasts a hung remote");
        match &cfg.runtimes[0].kind {
            RuntimeKindConfig::Remote(r) => {
                assert_eq!(r.base_url, "http://10.1.2.3:38800");
                assert_eq!((r.read_timeout.as_millis(), r.connect_timeout.as_millis()), (10_000, 2_000));
            }
            RuntimeKindConfig::Embedded(_) => panic!("remote expected"),
        }
        let small_pool = format!("[server]\nthreads = 8\n{remote}");
        assert!(format!("{:#}", parse(&small_pool).unwrap_err()).contains("max_in_flight"));
        let cases = [
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"", "base_url is required"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"ftp://x\"", "http://"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://u:p@x\"", "credentials"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x\"\nstore=\"fs\"", "runtimes.store"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\nbase_url=\"http://x\"", "runtimes.base_url"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x\"\nbogus=1", "bogus"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"cloud\"", "kind `cloud`"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        let leaky = parse("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"ftp://leaky-host:9\"").unwrap_err();
        assert!(!format!("{leaky:#}").contains("leaky-host"), "errors do not repeat the URL");
    }

    #[test]
    fn hundreds_of_remotes_fit_the_default_pool_cap() {
        let remotes: String = (0..200)
            .map(|n| format!("[[runtimes]]\nid=\"r{n}\"\nkind=\"remote\"\nbase_url=\"http://127.0.0.1:9\"\n"))
            .collect();
        let cfg = parse(&remotes).expect("200 remotes with the default pool");
        assert_eq!(cfg.server.threads, DEFAULT_THREADS_CEILING);
        let big =
            parse("[[runtimes]]\nid=\"big\"\nkind=\"remote\"\nbase_url=\"http://x\"\nmax_in_flight=2000\n").unwrap();
        assert!(big.server.threads > 2000, "the cap still outlasts the largest bulkhead");
    }

    #[test]
    fn runtime_process_config() {
        let overrides = RuntimeOverrides { runtime_id: Some("rt-a".into()), memory: true, ..Default::default() };
        let cfg = load_runtime(None, &overrides).unwrap();
        assert_eq!(cfg.server.bind.to_string(), "127.0.0.1:38800");
        assert_eq!((cfg.engine.runtime_id.as_str(), &cfg.engine.store), ("rt-a", &StoreKind::Memory));
        let defaults = load_runtime(None, &RuntimeOverrides::default()).unwrap();
        assert_eq!(defaults.engine.store, StoreKind::Fs(PathBuf::from("data/runtime")));
        let both = RuntimeOverrides { memory: true, data_dir: Some("d".into()), ..Default::default() };
        assert!(load_runtime(None, &both).is_err());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[server]\nbindd = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("bindd"), "{err}");
        let err =
            parse("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\ncolour=1\n").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            (
                "[server]\nbind = \"nowhere\"\n[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"",
                "server.bind",
            ),
            ("[[runtimes]]\nid=\"a/b\"\nkind=\"embedded\"\nstore=\"memory\"", "runtimes.id"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"disk\"", "runtimes.store"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"fs\"", "data_dir"),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"",
                "twice",
            ),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[profiles.x]\nkind=\"command\"", "argv"),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[profiles.x]\nkind=\"echo\"\nargv=[\"a\"]",
                "profiles.x",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[server]\ntoken_env=\"WG_TEST_SURELY_UNSET\"",
                "WG_TEST_SURELY_UNSET",
            ),
            ("", "at least one"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
    }

    #[test]
    fn relative_paths_resolve_lexically() {
        assert_eq!(resolve(Path::new("config"), Path::new("../data/local")), PathBuf::from("data/local"));
        assert_eq!(resolve(Path::new("/etc/wg"), Path::new("d")), PathBuf::from("/etc/wg/d"));
        assert_eq!(resolve(Path::new(""), Path::new("/abs")), PathBuf::from("/abs"));
    }
}
