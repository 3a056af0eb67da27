//! The browser-facing gateway: registry of runtimes, the `/api` service, start and stop.

pub mod api;
pub mod cursor;
pub mod errors;
pub mod registry;
pub mod relay;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{DEFAULT_MAX_WS_SESSIONS, GatewayConfig, RuntimeKindConfig};
use crate::http::browsers::HostPolicy;
use crate::http::websocket::SessionLimit;
use crate::http::{HttpServer, sockets};
use crate::runtime::engine::{Engine, Opening};
use crate::runtime::handle::RuntimeHandle;
use crate::runtime::remote::RemoteRuntime;
use api::{GatewayApi, Streams};
use registry::{Registry, RuntimeEntry};
use relay::{Hub, RelayOptions};

/// A running gateway: HTTP server plus the embedded engines it owns.
pub struct Gateway {
    http: HttpServer,
    engines: Vec<Arc<Engine>>,
    hub: Arc<Hub>,
    sessions: Arc<SessionLimit>,
    config: GatewayConfig,
}

impl Gateway {
    /// Opens every embedded runtime and starts serving. A start that fails leaves no data
    /// dir it created behind ([`Opening`]).
    pub fn start(config: GatewayConfig) -> anyhow::Result<Gateway> {
        let server = &config.server;
        // Relays (an upstream connection each, to a remote) may take a quarter of the
        // descriptors sessions and streams may have; browser sessions (one each) the rest.
        let budget = sockets::descriptor_budget();
        let mut relay = server.relay.clone();
        let default = RelayOptions::default().max_streams;
        relay.max_streams = sockets::fit_descriptors("max_event_streams", relay.max_streams, default, budget / 4);
        let max_sessions = sockets::fit_descriptors(
            "max_ws_sessions",
            server.max_ws_sessions,
            DEFAULT_MAX_WS_SESSIONS,
            budget - relay.max_streams,
        );
        let idle_each = idle_connections_each(&config, max_sessions + relay.max_streams);
        let mut opening = Opening::default();
        let mut entries = Vec::new();
        for runtime in &config.runtimes {
            let handle: Arc<dyn RuntimeHandle> = match &runtime.kind {
                RuntimeKindConfig::Embedded(options) => {
                    opening.open(options.clone()).with_context(|| format!("cannot start runtime `{}`", runtime.id))?
                }
                RuntimeKindConfig::Remote(options) => {
                    let mut options = options.clone();
                    options.max_idle_connections = options.max_idle_connections.min(idle_each);
                    Arc::new(RemoteRuntime::start(options))
                }
            };
            if let Some(problem) = &runtime.token_problem {
                log::warn!(
                    "runtime `{}`: no token ({problem}); its requests go without one, so a runtime that \
                     requires a token refuses them (auth_failed)",
                    runtime.id
                );
            }
            entries.push(RuntimeEntry { id: runtime.id.clone(), label: runtime.label.clone(), handle });
        }
        if !server.bind.ip().is_loopback() && server.token.is_none() {
            log::warn!(
                "listening on non-loopback {} without a browser token: anyone who can reach it can drive your workers; \
                 set [server] token_env and put a reverse proxy in front",
                server.bind
            );
        }
        let hosts =
            HostPolicy::new(server.bind, server.allowed_hosts.clone()).serving_tls(server.tls_cert_file.is_some());
        let streams = Streams {
            hub: Hub::new(relay),
            sessions: SessionLimit::new(max_sessions),
            allowed_origins: server.allowed_origins.clone(),
            http_metrics: Arc::default(),
        };
        let http_metrics = streams.http_metrics.clone();
        let (hub, sessions) = (streams.hub.clone(), streams.sessions.clone());
        let api = GatewayApi::new(Registry::new(entries), server.token.clone(), hosts, streams);
        let http = HttpServer::start(server, Arc::new(api), http_metrics)?;
        Ok(Gateway { http, engines: opening.keep(), hub, sessions, config })
    }

    /// The address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Stops accepting, finishes in-flight requests, closes event streams with 1001, ends
    /// running turns and flushes stores.
    pub fn shutdown(mut self) {
        let grace = self.config.server.shutdown_grace;
        self.http.shutdown(grace);
        self.hub.close_all();
        if !self.sessions.wait_idle(Duration::from_secs(2)) {
            log::warn!("{} event streams did not close in time", self.sessions.active());
        }
        for engine in &self.engines {
            engine.shutdown(grace);
        }
    }
}

/// Idle connections each remote runtime may keep: an even share of what the open-file
/// limit allows them all, given the descriptors `granted` to sessions and streams (0: each
/// call opens its own). Said in the log when it lowers what a runtime would keep.
fn idle_connections_each(config: &GatewayConfig, granted: usize) -> usize {
    let remotes: Vec<usize> = config
        .runtimes
        .iter()
        .filter_map(|r| match &r.kind {
            RuntimeKindConfig::Remote(options) => Some(options.max_idle_connections),
            RuntimeKindConfig::Embedded(_) => None,
        })
        .collect();
    let each = sockets::idle_connection_allowance(granted) / remotes.len().max(1);
    if remotes.iter().any(|&wanted| wanted > each) {
        log::info!(
            "{} remote runtime(s) keep at most {each} idle connection(s) each to fit the open file limit \
             (raise it: ulimit -n, or LimitNOFILE= under systemd)",
            remotes.len()
        );
    }
    each
}
