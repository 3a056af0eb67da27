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

use crate::http::router::valid_id;
use crate::runtime::engine::{EngineOptions, Profile, ProfileKind, StoreKind};
use crate::secret::Secret;

/// The shipped default configuration, used by `serve` without `--config`.
pub const DEFAULT_GATEWAY_TOML: &str = include_str!("../config/gateway.toml");

/// Settings of the HTTP server shared by `serve` and `runtime`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Request handler threads.
    pub threads: usize,
    /// Bounded request queue between the acceptor and the pool.
    pub queue: usize,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
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
    /// Embedded engine options (the only kind so far).
    pub engine: EngineOptions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    bind: Option<String>,
    threads: Option<usize>,
    queue: Option<usize>,
    max_body_bytes: Option<u64>,
    max_ws_sessions: Option<usize>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    shutdown_grace_ms: Option<u64>,
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
    store: Option<String>,
    data_dir: Option<PathBuf>,
    stop_grace_ms: Option<u64>,
    input_queue: Option<usize>,
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

/// Loads the gateway configuration from `path`, or the shipped default when `None`.
///
/// Relative paths in the file are relative to the file's folder; the built-in default
/// behaves as if it were `./config/gateway.toml`.
pub fn load_gateway(path: Option<&Path>) -> anyhow::Result<GatewayConfig> {
    let (text, base) = read_config(path)?;
    let raw: RawGateway = toml::from_str(&text).map_err(|e| config_error(path, e))?;
    let server = raw.server.validate(&base)?;
    let profiles = validate_profiles(raw.profiles, &base)?;
    ensure!(
        !raw.runtimes.is_empty(),
        "config: at least one [[runtimes]] entry is required"
    );
    let mut runtimes = Vec::with_capacity(raw.runtimes.len());
    for (index, rt) in raw.runtimes.into_iter().enumerate() {
        let runtime = rt
            .validate(&profiles, &base)
            .with_context(|| format!("config: [[runtimes]] entry {}", index + 1))?;
        ensure!(
            runtimes.iter().all(|r: &RuntimeConfig| r.id != runtime.id),
            "config: runtimes.id `{}` is used twice",
            runtime.id
        );
        runtimes.push(runtime);
    }
    Ok(GatewayConfig { server, runtimes })
}

fn read_config(path: Option<&Path>) -> anyhow::Result<(String, PathBuf)> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            Ok((text, base))
        }
        None => Ok((DEFAULT_GATEWAY_TOML.to_owned(), PathBuf::from("config"))),
    }
}

fn config_error(path: Option<&Path>, e: toml::de::Error) -> anyhow::Error {
    let name = path.map_or("built-in default config".to_owned(), |p| {
        p.display().to_string()
    });
    anyhow::anyhow!("invalid config {name}: {e}")
}

/// Joins `rel` onto `base` and removes `.`/`..` lexically (the folders need not exist).
fn resolve(base: &Path, rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in base.join(rel).components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

impl RawServer {
    fn validate(self, base: &Path) -> anyhow::Result<ServerConfig> {
        let bind_text = self.bind.unwrap_or_else(|| "127.0.0.1:8787".to_owned());
        let bind = bind_text.parse().map_err(|_| {
            anyhow::anyhow!("config: server.bind `{bind_text}` is not an IP:port address")
        })?;
        let threads = self.threads.unwrap_or_else(default_threads);
        ensure!(
            (1..=1024).contains(&threads),
            "config: server.threads must be 1..=1024"
        );
        let queue = self.queue.unwrap_or(256);
        ensure!(
            (1..=65_536).contains(&queue),
            "config: server.queue must be 1..=65536"
        );
        let max_body_bytes = self.max_body_bytes.unwrap_or(1 << 20);
        ensure!(
            max_body_bytes >= 1,
            "config: server.max_body_bytes must be at least 1"
        );
        let max_ws_sessions = self.max_ws_sessions.unwrap_or(1024);
        let token = load_token(
            self.token_env.as_deref(),
            self.token_file.as_deref(),
            base,
            "server",
        )?;
        Ok(ServerConfig {
            bind,
            threads,
            queue,
            max_body_bytes,
            max_ws_sessions,
            token,
            allowed_origins: self.allowed_origins,
            allowed_hosts: self.allowed_hosts,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms.unwrap_or(10_000)),
        })
    }
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
        (Some(var), None) => Secret::from_env(var)
            .map(Some)
            .with_context(|| format!("config: {section}.token_env")),
        (None, Some(path)) => Secret::from_file(&resolve(base, path))
            .map(Some)
            .with_context(|| format!("config: {section}.token_file")),
        (None, None) => Ok(None),
    }
}

impl RawRuntime {
    fn validate(
        self,
        profiles: &BTreeMap<String, Profile>,
        base: &Path,
    ) -> anyhow::Result<RuntimeConfig> {
        ensure!(
            valid_id(&self.id),
            "runtimes.id `{}` must match [A-Za-z0-9_:.-]{{1,120}}",
            self.id
        );
        ensure!(
            self.kind == "embedded",
            "runtimes.kind `{}` is not supported (expected \"embedded\")",
            self.kind
        );
        let store = parse_store(
            self.store.as_deref(),
            self.data_dir.as_deref(),
            base,
            "runtimes",
        )?;
        let mut engine = EngineOptions::new(&self.id, store, profiles.clone());
        if let Some(ms) = self.stop_grace_ms {
            engine.stop_grace = Duration::from_millis(ms);
        }
        if let Some(n) = self.input_queue {
            ensure!(n >= 1, "runtimes.input_queue must be at least 1");
            engine.input_queue = n;
        }
        Ok(RuntimeConfig {
            label: self.label.unwrap_or_else(|| self.id.clone()),
            id: self.id,
            engine,
        })
    }
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
            ensure!(
                data_dir.is_none(),
                "config: {section}.data_dir is only valid with store = \"fs\""
            );
            Ok(StoreKind::Memory)
        }
        "fs" => {
            let dir = data_dir.with_context(|| {
                format!("config: {section}.data_dir is required with store = \"fs\"")
            })?;
            Ok(StoreKind::Fs(resolve(base, dir)))
        }
        other => bail!("config: {section}.store `{other}` is not one of \"fs\", \"memory\""),
    }
}

/// Validates `[profiles.*]`; the built-in `echo` profile exists even when not configured.
fn validate_profiles(
    raw: BTreeMap<String, RawProfile>,
    base: &Path,
) -> anyhow::Result<BTreeMap<String, Profile>> {
    let mut profiles = BTreeMap::new();
    profiles.insert("echo".to_owned(), Profile::echo("echo", Duration::ZERO));
    for (name, p) in raw {
        let profile = p
            .validate(&name, base)
            .with_context(|| format!("config: [profiles.{name}]"))?;
        profiles.insert(name, profile);
    }
    Ok(profiles)
}

impl RawProfile {
    fn validate(self, name: &str, base: &Path) -> anyhow::Result<Profile> {
        ensure!(
            valid_id(name),
            "profile name `{name}` must match [A-Za-z0-9_:.-]{{1,120}}"
        );
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
                Ok(Profile::echo(
                    name,
                    Duration::from_millis(self.delay_ms.unwrap_or(0)),
                ))
            }
            "command" => {
                ensure!(
                    self.delay_ms.is_none(),
                    "delay_ms is only valid for kind = \"echo\""
                );
                let argv = self
                    .argv
                    .context("argv is required for kind = \"command\"")?;
                ensure!(
                    !argv.is_empty() && !argv[0].is_empty(),
                    "argv must name a program"
                );
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
        let dir =
            std::env::temp_dir().join(format!("wg-config-{}-{}", std::process::id(), text.len()));
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
        assert_eq!(
            cfg.runtimes[0].engine.store,
            StoreKind::Fs(PathBuf::from("data/local"))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[server]\nbindd = \"127.0.0.1:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bindd"), "{err}");
        let err = parse("[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\ncolour=1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            (
                "[server]\nbind = \"nowhere\"\n[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"",
                "server.bind",
            ),
            (
                "[[runtimes]]\nid=\"a/b\"\nkind=\"embedded\"\nstore=\"memory\"",
                "runtimes.id",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"disk\"",
                "runtimes.store",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"fs\"",
                "data_dir",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"",
                "twice",
            ),
            (
                "[[runtimes]]\nid=\"a\"\nkind=\"embedded\"\nstore=\"memory\"\n[profiles.x]\nkind=\"command\"",
                "argv",
            ),
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
        assert_eq!(
            resolve(Path::new("config"), Path::new("../data/local")),
            PathBuf::from("data/local")
        );
        assert_eq!(
            resolve(Path::new("/etc/wg"), Path::new("d")),
            PathBuf::from("/etc/wg/d")
        );
        assert_eq!(
            resolve(Path::new(""), Path::new("/abs")),
            PathBuf::from("/abs")
        );
    }
}
