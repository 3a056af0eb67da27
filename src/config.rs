//! TOML configuration → validated settings.
//!
//! The file format is the contract of architecture.md: `[server]`, `[[runtimes]]`,
//! `[profiles.*]` (gateway) and `[server]`, `[runtime]`, `[profiles.*]` (runtime process).
//! Unknown keys and invalid values are rejected with a message naming the file, line, table
//! and key (module `locate`). Tokens are never in the file: only the environment variable or file
//! that holds them.

mod locate;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

use crate::gateway::relay::RelayOptions;
use crate::http::router::valid_id;
use crate::runtime::engine::{EngineOptions, Profile, ProfileKind, StoreKind};
use crate::runtime::remote::RemoteOptions;
use crate::secret::Secret;
use locate::Source;

/// WebSocket sessions at once unless `[server] max_ws_sessions` says otherwise (and the
/// descriptor limit allows).
pub const DEFAULT_MAX_WS_SESSIONS: usize = 16_384;

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
    /// PEM certificate chain and key: with both, the server speaks HTTPS/WSS itself.
    pub tls_cert_file: Option<PathBuf>,
    /// See `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
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
    /// Why a remote runtime's token could not be loaded (its variable is unset, its file
    /// unreadable). The gateway still starts: requests to that runtime go without a token, so
    /// one that requires a token refuses them and shows as `auth_failed`.
    pub token_problem: Option<String>,
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
    max_event_streams: Option<usize>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
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

/// One `[[runtimes]]` table. The keys of both kinds are listed here, not flattened in from
/// [`RawEngine`] and [`RawRemote`]: serde then reports an unknown or mistyped key at its own
/// line, with the list of valid keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    id: String,
    kind: String,
    label: Option<String>,
    store: Option<String>,
    data_dir: Option<PathBuf>,
    stop_grace_ms: Option<u64>,
    input_queue: Option<usize>,
    retained_events: Option<usize>,
    base_url: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    probe_timeout_ms: Option<u64>,
    probe_interval_ms: Option<u64>,
    event_silence_ms: Option<u64>,
    max_in_flight: Option<usize>,
}

/// Keys of an embedded runtime (and of a runtime process's `[runtime]`).
#[derive(Default)]
struct RawEngine {
    store: Option<String>,
    data_dir: Option<PathBuf>,
    stop_grace_ms: Option<u64>,
    input_queue: Option<usize>,
    retained_events: Option<usize>,
}

/// Keys of a remote runtime.
struct RawRemote {
    base_url: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
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

/// Default cap of request handler threads (before the remotes' share): 2 × cores, at least
/// 64. Threads start only under load, so the cap costs nothing idle; what it bounds is how
/// many slow clients (a trickled body, a hung runtime) it takes to keep everyone waiting.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).max(64)
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
    load_gateway_reading(path, BrowserToken::Read)
}

/// The gateway configuration as `worker-gateway check` needs it: checked as for `serve`, but
/// the browser token is not read (`check` serves no browser: a CI job checking the runtimes
/// need not hold that secret).
pub fn load_gateway_to_check(path: Option<&Path>) -> anyhow::Result<GatewayConfig> {
    load_gateway_reading(path, BrowserToken::Unread)
}

/// Whether `[server]`'s token is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BrowserToken {
    Read,
    Unread,
}

fn load_gateway_reading(path: Option<&Path>, browser_token: BrowserToken) -> anyhow::Result<GatewayConfig> {
    let (source, base) = read_config(path)?;
    let raw: RawGateway = toml::from_str(source.text()).map_err(|e| source.parse_error(&e, ("runtime", "runtime")))?;
    let profiles = validate_profiles(raw.profiles, &base, &source)?;
    if raw.runtimes.is_empty() {
        return Err(source.file_error(&anyhow::anyhow!("at least one [[runtimes]] entry is required")));
    }
    let mut runtimes = Vec::with_capacity(raw.runtimes.len());
    for (index, rt) in raw.runtimes.into_iter().enumerate() {
        let at_runtime = |e: anyhow::Error| source.table_error(&["runtimes"], Some(index), &e);
        let runtime = rt.validate(&profiles, &base).map_err(at_runtime)?;
        if runtimes.iter().any(|r: &RuntimeConfig| r.id == runtime.id) {
            return Err(at_runtime(anyhow::anyhow!("runtimes.id `{}` is used twice", runtime.id)));
        }
        runtimes.push(runtime);
    }
    let remote_caps: Vec<usize> = runtimes
        .iter()
        .filter_map(|r| match &r.kind {
            RuntimeKindConfig::Remote(remote) => Some(remote.max_in_flight),
            RuntimeKindConfig::Embedded(_) => None,
        })
        .collect();
    let server = raw
        .server
        .validate(&base, &remote_caps, browser_token)
        .map_err(|e| source.table_error(&["server"], None, &e))?;
    Ok(GatewayConfig { server, runtimes })
}

/// Loads a runtime process's configuration (`[server]`, `[runtime]`, `[profiles.*]`) from
/// `path` (or defaults), then applies the command-line `overrides`.
///
/// Defaults: bind `127.0.0.1:38800`, id `runtime`, fs store in `./data/<id>`.
pub fn load_runtime(path: Option<&Path>, overrides: &RuntimeOverrides) -> anyhow::Result<RuntimeServerConfig> {
    let (source, base) = match path {
        Some(_) => read_config(path)?,
        None => (Source::new(None, String::new()), PathBuf::new()),
    };
    let mut raw: RawRuntimeFile =
        toml::from_str(source.text()).map_err(|e| source.parse_error(&e, ("runtimes", "serve")))?;
    let at_server = |e: anyhow::Error| source.table_error(&["server"], None, &e);
    if raw.server.token_env.is_some() || raw.server.token_file.is_some() {
        return Err(at_server(anyhow::anyhow!(
            "a runtime's token goes in [runtime] token_env / token_file, not [server]"
        )));
    }
    raw.server.bind = raw.server.bind.or_else(|| Some("127.0.0.1:38800".to_owned()));
    let mut server = raw.server.validate(&base, &[], BrowserToken::Read).map_err(at_server)?;
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
    let profiles = validate_profiles(raw.profiles, &base, &source)?;
    let at_runtime = |e: anyhow::Error| source.table_error(&["runtime"], None, &e);
    let engine =
        engine_keys.validate(&id, &profiles, cli_base.as_deref().unwrap_or(&base), "runtime").map_err(at_runtime)?;
    let token = match (&overrides.token_env, &overrides.token_file) {
        (None, None) => load_token(section.token_env.as_deref(), section.token_file.as_deref(), &base, "runtime")
            .map_err(at_runtime)?,
        (env, file) => load_token(env.as_deref(), file.as_deref(), Path::new(""), "--token")?,
    };
    Ok(RuntimeServerConfig { server, engine, token })
}

/// The largest config file read: a config is a few KiB, hundreds of runtimes included.
const MAX_CONFIG_BYTES: usize = 4 << 20;

/// The config's text, named for messages, and the folder its relative paths start from.
fn read_config(path: Option<&Path>) -> anyhow::Result<(Source, PathBuf)> {
    match path {
        Some(p) => {
            let unreadable = || format!("cannot read config file {}", p.display());
            let bytes = crate::files::read_small_file(p, MAX_CONFIG_BYTES).with_context(unreadable)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("config file {} is not UTF-8 text", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            Ok((Source::new(Some(p.display().to_string()), text), base))
        }
        None => {
            let name = "built-in config/gateway.toml".to_owned();
            Ok((Source::new(Some(name), DEFAULT_GATEWAY_TOML.to_owned()), PathBuf::from("config")))
        }
    }
}

/// A listen address: `IP:port`, or `host:port` resolved now (`localhost:8787`). A name
/// with several addresses binds its first IPv4 one (else its first): the listener binds one.
pub fn parse_bind(text: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let hint = "use IP:port or host:port, e.g. 127.0.0.1:8787";
    let addrs: Vec<SocketAddr> = match text.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) if text.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) => {
            bail!("`{text}` does not resolve ({e})")
        }
        Err(_) => bail!("`{text}` is not an address: {hint}"),
    };
    let first_v4 = addrs.iter().find(|a| a.is_ipv4());
    first_v4.or(addrs.first()).copied().with_context(|| format!("`{text}` resolves to no address"))
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
    /// is 2 × cores (at least 64) plus each remote's `max_in_flight` (at most 1024, and always
    /// more than the largest), and an explicit `threads` must exceed every remote's
    /// `max_in_flight`.
    fn validate(self, base: &Path, remote_caps: &[usize], browser_token: BrowserToken) -> anyhow::Result<ServerConfig> {
        let relay = self.relay_options()?;
        let bind_text = self.bind.unwrap_or_else(|| "127.0.0.1:8787".to_owned());
        let bind = parse_bind(&bind_text).context("server.bind")?;
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
        ensure!((1..=GIB).contains(&max_body_bytes), "config: server.max_body_bytes must be 1..=1073741824 (1 GiB)");
        let max_pending_response_bytes = self.max_pending_response_bytes.unwrap_or(64 << 20);
        ensure!(
            (1..=16 * GIB as usize).contains(&max_pending_response_bytes),
            "config: server.max_pending_response_bytes must be 1..=17179869184 (16 GiB)"
        );
        let max_ws_sessions = self.max_ws_sessions.unwrap_or(DEFAULT_MAX_WS_SESSIONS);
        ensure!(max_ws_sessions >= 1, "config: server.max_ws_sessions must be at least 1");
        let (env, file) = (self.token_env.as_deref(), self.token_file.as_deref());
        let token = match browser_token {
            BrowserToken::Read => load_token(env, file, base, "server")?,
            BrowserToken::Unread => one_token_source(env, file, "server").map(|()| None)?,
        };
        for origin in &self.allowed_origins {
            check_origin(origin)?;
        }
        for host in &self.allowed_hosts {
            check_host(host)?;
        }
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
            shutdown_grace: millis("shutdown_grace_ms", self.shutdown_grace_ms.unwrap_or(10_000), 0..=HOUR_MS)?,
            relay,
            tls_cert_file: self.tls_cert_file.map(|path| resolve(base, &path)),
            tls_key_file: self.tls_key_file.map(|path| resolve(base, &path)),
        })
    }

    fn relay_options(&self) -> anyhow::Result<RelayOptions> {
        let defaults = RelayOptions::default();
        let options = RelayOptions {
            ring_events: self.event_ring.unwrap_or(defaults.ring_events),
            ring_bytes: self.event_ring_bytes.unwrap_or(defaults.ring_bytes),
            queue: self.subscriber_queue.unwrap_or(defaults.queue),
            lag_limit: self.slow_consumer_limit.unwrap_or(defaults.lag_limit),
            max_streams: self.max_event_streams.unwrap_or(defaults.max_streams),
            ..defaults
        };
        ensure!(
            options.ring_events >= 1 && (1..=GIB as usize).contains(&options.ring_bytes),
            "config: server.event_ring must be at least 1 and event_ring_bytes 1..=1073741824 (1 GiB)"
        );
        ensure!(
            options.queue >= 1 && options.lag_limit >= 1,
            "config: server.subscriber_queue and slow_consumer_limit must be at least 1"
        );
        ensure!(options.max_streams >= 1, "config: server.max_event_streams must be at least 1");
        Ok(options)
    }
}

/// Refuses a token named both ways (`section` as for [`load_token`]; a config table's
/// errors are prefixed with the table where they are reported).
fn one_token_source(env: Option<&str>, file: Option<&Path>, section: &str) -> anyhow::Result<()> {
    match (env.is_some() && file.is_some(), section) {
        (false, _) => Ok(()),
        (true, "--token") => bail!("--token-env and --token-file: set one of them, not both"),
        (true, _) => bail!("set token_env or token_file, not both"),
    }
}

/// Loads a token named by `token_env` or `token_file` (never both) of config table
/// `section`; `section` `--token` names the command line's `--token-env`/`--token-file`.
pub fn load_token(
    env: Option<&str>,
    file: Option<&Path>,
    base: &Path,
    section: &str,
) -> anyhow::Result<Option<Secret>> {
    one_token_source(env, file, section)?;
    let [env_name, file_name] = match section {
        "--token" => ["--token-env".to_owned(), "--token-file".to_owned()],
        _ => ["token_env", "token_file"].map(|key| format!("config: {section}.{key}")),
    };
    match (env, file) {
        (Some(var), _) => Secret::from_env(var).map(Some).with_context(|| env_name),
        (None, Some(path)) => Secret::from_file(&resolve(base, path)).map(Some).with_context(|| file_name),
        (None, None) => Ok(None),
    }
}

impl RawRuntime {
    fn validate(self, profiles: &BTreeMap<String, Profile>, base: &Path) -> anyhow::Result<RuntimeConfig> {
        ensure!(valid_id(&self.id), "runtimes.id `{}` must match [A-Za-z0-9_:.-]{{1,120}}", self.id);
        let engine = RawEngine {
            store: self.store,
            data_dir: self.data_dir,
            stop_grace_ms: self.stop_grace_ms,
            input_queue: self.input_queue,
            retained_events: self.retained_events,
        };
        let remote = RawRemote {
            base_url: self.base_url,
            token_env: self.token_env,
            token_file: self.token_file,
            ca_file: self.ca_file,
            connect_timeout_ms: self.connect_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            read_timeout_ms: self.read_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            probe_timeout_ms: self.probe_timeout_ms,
            probe_interval_ms: self.probe_interval_ms,
            event_silence_ms: self.event_silence_ms,
            max_in_flight: self.max_in_flight,
        };
        let (kind, token_problem) = match self.kind.as_str() {
            "embedded" => {
                remote.ensure_unset()?;
                (RuntimeKindConfig::Embedded(engine.validate(&self.id, profiles, base, "runtimes")?), None)
            }
            "remote" => {
                engine.ensure_unset()?;
                let (options, token_problem) = remote.validate(&self.id, base)?;
                (RuntimeKindConfig::Remote(options), token_problem)
            }
            other => bail!("runtimes.kind `{other}` is not one of \"embedded\", \"remote\""),
        };
        Ok(RuntimeConfig { label: self.label.unwrap_or_else(|| self.id.clone()), id: self.id, kind, token_problem })
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
            engine.stop_grace = millis("stop_grace_ms", ms, 0..=HOUR_MS)?;
        }
        if let Some(n) = self.input_queue {
            ensure!((1..=MAX_INPUT_QUEUE).contains(&n), "{section}.input_queue must be 1..={MAX_INPUT_QUEUE}");
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
    /// The options, and why the token could not be loaded (the runtime still starts: see
    /// [`RuntimeConfig::token_problem`]). Setting both `token_env` and `token_file` is an error.
    fn validate(self, id: &str, base: &Path) -> anyhow::Result<(RemoteOptions, Option<String>)> {
        let url = self.base_url.context("runtimes.base_url is required for kind = \"remote\"")?;
        let base_url = validate_base_url(&url)?;
        let one_source = self.token_env.is_some() != self.token_file.is_some();
        let (token, token_problem) =
            match load_token(self.token_env.as_deref(), self.token_file.as_deref(), base, "runtimes") {
                Ok(token) => (token, None),
                Err(e) if one_source => (None, Some(e.root_cause().to_string())),
                Err(e) => return Err(e),
            };
        let ca_file = self.ca_file.map(|path| resolve(base, &path));
        let tls = crate::tls::client::for_base_url(&base_url, ca_file.as_deref())?;
        let ms = |value: Option<u64>, default: u64, key: &str| {
            millis(&format!("runtimes.{key}"), value.unwrap_or(default), 1..=HOUR_MS)
        };
        let request_ms = self.request_timeout_ms.unwrap_or(10_000);
        ms(Some(request_ms), request_ms, "request_timeout_ms")?;
        let max_in_flight = self.max_in_flight.unwrap_or(32);
        ensure!((1..=4096).contains(&max_in_flight), "runtimes.max_in_flight must be 1..=4096");
        let options = RemoteOptions {
            runtime_id: id.to_owned(),
            base_url,
            token,
            tls,
            connect_timeout: ms(self.connect_timeout_ms, 2_000, "connect_timeout_ms")?,
            read_timeout: ms(self.read_timeout_ms, request_ms, "read_timeout_ms")?,
            write_timeout: ms(self.write_timeout_ms, request_ms, "write_timeout_ms")?,
            probe_timeout: ms(self.probe_timeout_ms, 2_000, "probe_timeout_ms")?,
            probe_interval: ms(self.probe_interval_ms, 5_000, "probe_interval_ms")?,
            event_silence: ms(self.event_silence_ms, 60_000, "event_silence_ms")?,
            max_in_flight,
            max_idle_connections: max_in_flight.max(4),
        };
        Ok((options, token_problem))
    }

    fn ensure_unset(&self) -> anyhow::Result<()> {
        let set = [
            ("base_url", self.base_url.is_some()),
            ("token_env", self.token_env.is_some()),
            ("token_file", self.token_file.is_some()),
            ("ca_file", self.ca_file.is_some()),
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
    let (host, port) = split_authority(authority).context("runtimes.base_url has an unclosed `[` in its host")?;
    ensure!(!host.is_empty(), "runtimes.base_url has no host");
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => ensure!(
            ip.parse::<std::net::Ipv6Addr>().is_ok(),
            "runtimes.base_url has a host in brackets that is not an IPv6 address"
        ),
        None => ensure!(!host.contains(':'), "runtimes.base_url: an IPv6 host goes in brackets, and there is one port"),
    }
    if let Some(port) = port {
        ensure!(
            port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0),
            "runtimes.base_url has an invalid port: a number from 1 to 65535"
        );
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// An authority's host (an IPv6 one in its brackets) and port, if any; `None` when a `[` is
/// not closed, or something other than a port follows its `]`.
fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => Some((host, Some(rest.strip_prefix(':')?))),
        };
    }
    Some(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
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
            // An empty one would be the config file's own folder, shared with whatever is there.
            ensure!(
                !dir.to_string_lossy().trim().is_empty(),
                "config: {section}.data_dir must name a folder (it is empty or blank)"
            );
            Ok(StoreKind::Fs(resolve(base, dir)))
        }
        other => bail!("config: {section}.store `{other}` is not one of \"fs\", \"memory\""),
    }
}

/// Validates `[profiles.*]`; the built-in `echo` profile exists even when not configured.
fn validate_profiles(
    raw: BTreeMap<String, RawProfile>,
    base: &Path,
    source: &Source,
) -> anyhow::Result<BTreeMap<String, Profile>> {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    for (name, p) in raw {
        let profile = p.validate(&name, base).map_err(|e| source.table_error(&["profiles", &name], None, &e))?;
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
                Ok(Profile::echo(name, millis("delay_ms", self.delay_ms.unwrap_or(0), 0..=HOUR_MS)?))
            }
            "command" => {
                ensure!(self.delay_ms.is_none(), "delay_ms is only valid for kind = \"echo\"");
                let argv = self.argv.context("argv is required for kind = \"command\"")?;
                ensure!(!argv.is_empty() && !argv[0].is_empty(), "argv must name a program");
                let turn_timeout = millis("turn_timeout_ms", self.turn_timeout_ms.unwrap_or(30_000), 1..=DAY_MS)?;
                let max_output_bytes = self.max_output_bytes.unwrap_or(1 << 20);
                ensure!(
                    (1..=MAX_OUTPUT_BYTES).contains(&max_output_bytes),
                    "max_output_bytes must be 1..={MAX_OUTPUT_BYTES}"
                );
                Ok(Profile {
                    name: name.to_owned(),
                    kind: ProfileKind::Command {
                        argv,
                        cwd: self.cwd.map(|c| resolve(base, &c)),
                        env: self.env,
                        turn_timeout,
                        max_output_bytes,
                    },
                })
            }
            other => bail!("kind `{other}` is not one of \"echo\", \"command\""),
        }
    }
}

/// An `allowed_origins` entry: an origin as a browser sends it, `scheme://host[:port]`.
/// `null` would admit sandboxed pages and files of any site, and there are no patterns.
fn check_origin(origin: &str) -> anyhow::Result<()> {
    let shown = crate::http::error::visible(origin, 120);
    ensure!(
        !origin.eq_ignore_ascii_case("null"),
        "server.allowed_origins: \"null\" would admit sandboxed pages and local files of any site; list origins such as \"https://app.example\""
    );
    let lower = origin.to_ascii_lowercase();
    let (scheme, authority) = lower.split_once("://").unwrap_or(("", ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let plain = matches!(scheme, "http" | "https")
        && !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    ensure!(
        plain,
        "server.allowed_origins: `{shown}` is not an origin: write scheme://host[:port], as a browser sends it (no path, no wildcard)"
    );
    // A browser leaves the scheme's own port out: an entry with it would never match.
    let default_port = if scheme == "https" { "443" } else { "80" };
    match port {
        Some(port) if port == default_port => {
            bail!("server.allowed_origins: `{shown}`: leave out :{port}, as a browser does for {scheme}")
        }
        Some(port) => ensure!(
            port.parse::<u16>().is_ok_and(|p| p > 0),
            "server.allowed_origins: `{shown}`: the port must be 1..=65535"
        ),
        None => {}
    }
    Ok(())
}

/// An `allowed_hosts` entry: a name or address as a `Host` header carries it, without the
/// port (which is not compared: an entry with one would never match), an IPv6 address in
/// brackets.
fn check_host(host: &str) -> anyhow::Result<()> {
    let shown = crate::http::error::visible(host, 120);
    let name =
        !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
    let ipv6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    ensure!(
        name || ipv6,
        "server.allowed_hosts: `{shown}` is not a host: write a name or address as in \"gateway.example\", \"10.0.0.5\" or \"[fd00::5]\", without a port (any port is accepted) or wildcard"
    );
    Ok(())
}

/// A gibibyte: the bound of the byte sizes a config sets, far past any sensible value and
/// far from overflowing what is computed from them.
const GIB: u64 = 1 << 30;

/// The longest a grace, delay or budget may be, in milliseconds (an hour): a bigger one is a
/// mistake, and one near `u64::MAX` would overflow the clock it is added to.
const HOUR_MS: u64 = 3_600_000;

/// The longest a command profile's turn may be allowed, in milliseconds (a day).
const DAY_MS: u64 = 24 * HOUR_MS;

/// Inputs a worker may queue at most.
const MAX_INPUT_QUEUE: usize = 1_000_000;

/// The most output a command profile's turn may keep (stdout, stderr each).
const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// Setting `key`, `value` milliseconds, checked to be within `range`.
fn millis(key: &str, value: u64, range: std::ops::RangeInclusive<u64>) -> anyhow::Result<Duration> {
    ensure!(range.contains(&value), "{key} must be {}..={} (ms)", range.start(), range.end());
    Ok(Duration::from_millis(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<GatewayConfig> {
        // A directory of its own per call: tests run in parallel.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wg-config-{}-{call}", std::process::id()));
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
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x:99999\"", "invalid port"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x:0/\"", "invalid port"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x:\"", "invalid port"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://[::1:9\"", "unclosed `[`"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://:80\"", "no host"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://h:1:99\"", "one port"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://::1:80\"", "in brackets"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://h:+80\"", "invalid port"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://[127.0.0.1]:80\"", "not an IPv6"),
            (
                "[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x\"\nstore=\"fs\"",
                "store is only valid for kind = \"embedded\"",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\nbase_url=\"http://x\"",
                "base_url is only valid for kind = \"remote\"",
            ),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://x\"\nbogus=1", "bogus"),
            ("[[runtimes]]\nid=\"lab\"\nkind=\"cloud\"", "kind `cloud`"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        for fine in ["http://[::1]:38800", "https://[::1]", "http://h.example:1/prefix"] {
            let text = format!("[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"{fine}\"");
            assert!(parse(&text).is_ok(), "{fine}");
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
                "server: bind: `nowhere` is not an address",
            ),
            ("[[runtimes]]\nid=\"a/b\"\nkind=\"embedded\"\nstore=\"memory\"", "id `a/b` must match"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"disk\"", "store `disk` is not one of"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"fs\"", "data_dir"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"fs\"\ndata_dir=\"\"", "data_dir must name a folder"),
            ("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"fs\"\ndata_dir=\"  \"", "empty or blank"),
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
    fn errors_name_the_file_the_line_and_the_runtime() {
        let text = "[server]\nbind = \"127.0.0.1:0\"\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\n\
                    store = \"memory\"\n\n[[runtimes]]\nid = \"lab\"\nkind = \"remote\"\n# the URL:\nbse_url = \"x\"\n";
        let err = parse(text).unwrap_err().to_string();
        let (file, rest) = err.split_once(':').unwrap();
        assert!(file.ends_with("gateway.toml"), "{err}");
        assert!(
            rest.starts_with(
                "13: runtimes[1] (id \"lab\"): unknown key \"bse_url\"; valid keys: id, kind, label, store,"
            ),
            "{err}"
        );
        assert!(rest.contains(" base_url, token_env, token_file,"), "{err}");
        let twice = parse(&text.replace("bse_url = \"x\"", "base_url = \"http://x\"").replace("\"lab\"", "\"local\""))
            .unwrap_err()
            .to_string();
        assert!(twice.ends_with(":10: runtimes[1] (id \"local\"): id `local` is used twice"), "{twice}");
        let typed = parse("[server]\nqueue = \"8\"\n").unwrap_err().to_string();
        assert!(typed.ends_with(":2: server: queue: invalid type: string \"8\", expected usize"), "{typed}");
        let profile = parse(
            "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[profiles.x]\nkind=\"command\"\nargv=[]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(profile.ends_with(":7: profiles.x: argv must name a program"), "{profile}");
    }

    /// Durations and sizes are bounded (one near `u64::MAX` overflowed the clock, and a
    /// SIGTERM never finished), and `allowed_origins` takes origins only.
    #[test]
    fn settings_are_bounded_and_origins_are_origins() {
        let embedded = "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n";
        let huge = u64::MAX;
        for (text, said) in [
            (
                format!("[server]\nshutdown_grace_ms = {huge}\n{embedded}"),
                "server: shutdown_grace_ms must be 0..=3600000 (ms)",
            ),
            (format!("{embedded}stop_grace_ms = {huge}\n"), "stop_grace_ms must be 0..=3600000 (ms)"),
            (format!("{embedded}input_queue = 2000000\n"), "input_queue must be 1..=1000000"),
            (
                format!("{embedded}[profiles.x]\nkind=\"echo\"\ndelay_ms = {huge}\n"),
                "delay_ms must be 0..=3600000 (ms)",
            ),
            (
                format!("{embedded}[profiles.x]\nkind=\"command\"\nargv=[\"cat\"]\nturn_timeout_ms = {huge}\n"),
                "turn_timeout_ms must be 1..=86400000 (ms)",
            ),
            (format!("[server]\nallowed_origins = [\"null\"]\n{embedded}"), "\"null\" would admit sandboxed pages"),
            (format!("[server]\nallowed_origins = [\"*\"]\n{embedded}"), "`*` is not an origin"),
            (format!("[server]\nallowed_origins = [\"https://a.example/app\"]\n{embedded}"), "is not an origin"),
            (format!("[server]\nallowed_origins = [\"http://a.example:80\"]\n{embedded}"), "leave out :80"),
            (format!("[server]\nallowed_origins = [\"http://a.example:99999\"]\n{embedded}"), "1..=65535"),
            (format!("[server]\nmax_ws_sessions = 0\n{embedded}"), "max_ws_sessions must be at least 1"),
            (format!("[server]\nallowed_hosts = [\"a b\"]\n{embedded}"), "`a b` is not a host"),
            (format!("[server]\nallowed_hosts = [\"*\"]\n{embedded}"), "`*` is not a host"),
            (format!("[server]\nallowed_hosts = [\"evil.example:80\"]\n{embedded}"), "without a port"),
            (format!("[server]\nallowed_hosts = [\"fd00::5\"]\n{embedded}"), "\"[fd00::5]\""),
            (format!("[server]\nmax_body_bytes = {huge}\n{embedded}"), "max_body_bytes must be 1..=1073741824"),
            (format!("[server]\nevent_ring_bytes = {huge}\n{embedded}"), "event_ring_bytes 1..=1073741824"),
            (
                format!("[server]\nmax_pending_response_bytes = {huge}\n{embedded}"),
                "max_pending_response_bytes must be 1..=17179869184",
            ),
        ] {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(said), "{text}: {err}");
        }
        let ok = parse(&format!(
            "[server]\nallowed_origins = [\"https://app.example:8443\", \"HTTP://[::1]:3000\"]\n{embedded}"
        ));
        assert_eq!(ok.expect("origins").server.allowed_origins.len(), 2);
        let ok = parse(&format!("[server]\nallowed_hosts = [\"gw.example\", \"10.0.0.5\", \"[fd00::5]\"]\n{embedded}"));
        assert_eq!(ok.expect("hosts").server.allowed_hosts.len(), 3);
    }

    #[test]
    fn bind_takes_a_host_name() {
        assert_eq!(parse_bind("localhost:8787").unwrap().to_string(), "127.0.0.1:8787");
        assert_eq!(parse_bind("[::1]:0").unwrap().to_string(), "[::1]:0");
        let cfg =
            parse("[server]\nbind = \"localhost:0\"\n[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n")
                .expect("localhost binds");
        assert!(cfg.server.bind.ip().is_loopback());
        for bad in ["nowhere", "localhost", "127.0.0.1:99999"] {
            let err = format!("{:#}", parse_bind(bad).unwrap_err());
            assert!(err.contains(&format!("`{bad}` is not an address")), "{err}");
        }
    }

    #[test]
    fn a_remote_without_its_token_still_loads_and_says_why() {
        let remote = "[[runtimes]]\nid=\"lab\"\nkind=\"remote\"\nbase_url=\"http://10.1.2.3:1\"\n";
        let cfg = parse(&format!("{remote}token_env=\"WG_TEST_TOKEN_NEVER_SET\"\n")).expect("loads");
        let problem = cfg.runtimes[0].token_problem.as_deref().unwrap_or_default();
        assert_eq!(problem, "environment variable `WG_TEST_TOKEN_NEVER_SET` is not set");
        let RuntimeKindConfig::Remote(options) = &cfg.runtimes[0].kind else { panic!("remote expected") };
        assert!(options.token.is_none());
        let cfg = parse(&format!("{remote}token_file=\"no/such/token-file\"\n")).expect("loads");
        assert!(cfg.runtimes[0].token_problem.as_deref().unwrap_or_default().contains("no/such/token-file"));
        let both = parse(&format!("{remote}token_env=\"A\"\ntoken_file=\"b\"\n")).unwrap_err().to_string();
        assert!(both.contains("set token_env or token_file, not both"), "{both}");
    }

    #[test]
    fn a_command_line_token_is_named_by_its_flag() {
        let unset = load_token(Some("WG_TEST_TOKEN_NEVER_SET"), None, Path::new(""), "--token").unwrap_err();
        assert_eq!(format!("{unset:#}"), "--token-env: environment variable `WG_TEST_TOKEN_NEVER_SET` is not set");
        let missing = load_token(None, Some(Path::new("no/such/file")), Path::new(""), "--token").unwrap_err();
        assert!(format!("{missing:#}").starts_with("--token-file: "), "{missing:#}");
    }

    #[test]
    fn relative_paths_resolve_lexically() {
        assert_eq!(resolve(Path::new("config"), Path::new("../data/local")), PathBuf::from("data/local"));
        assert_eq!(resolve(Path::new("/etc/wg"), Path::new("d")), PathBuf::from("/etc/wg/d"));
        assert_eq!(resolve(Path::new(""), Path::new("/abs")), PathBuf::from("/abs"));
    }
}
