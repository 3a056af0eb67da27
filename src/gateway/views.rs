//! Browser-facing JSON shapes (gateway-api.md), built from the Runtime API's wire types.
//! A view never carries anything but ids, labels and state: no URL, host or token.

use serde::{Deserialize, Serialize};

use crate::runtime::handle::{Health, RuntimeKind};
use crate::runtime::types::{
    Activity, InputAck, InputKind, Intent, LifecycleAck, ProfileRef, Role, Transcript, WorkerDetail, WorkerStatus,
    WorkerSummary,
};

/// What a runtime can do, as browsers see it.
#[derive(Debug, Serialize)]
pub struct RuntimeCapabilities {
    can_list_workers: bool,
    can_spawn_worker: bool,
    can_accept_input: bool,
    can_stop_worker: bool,
    can_cancel_worker: bool,
    can_stream_events: bool,
    can_read_transcript: bool,
}

/// `RuntimeSummary` of the gateway API.
#[derive(Debug, Serialize)]
pub struct RuntimeView {
    runtime_id: String,
    label: String,
    kind: RuntimeKind,
    status: String,
    health: Health,
    capabilities: RuntimeCapabilities,
    profiles: Vec<String>,
    worker_count: Option<u64>,
}

impl RuntimeView {
    /// Builds the view from the runtime's cached health (and the summary it holds).
    pub fn new(runtime_id: &str, label: &str, kind: RuntimeKind, health: Health) -> RuntimeView {
        let summary = health.summary.as_ref();
        let reachable = health.is_ready();
        RuntimeView {
            runtime_id: runtime_id.to_owned(),
            label: label.to_owned(),
            kind,
            status: match summary {
                Some(s) if reachable => s.status.clone(),
                _ => "unavailable".to_owned(),
            },
            capabilities: RuntimeCapabilities {
                can_list_workers: true,
                can_spawn_worker: true,
                can_accept_input: true,
                can_stop_worker: true,
                can_cancel_worker: true,
                can_stream_events: true,
                can_read_transcript: true,
            },
            profiles: summary.and_then(|s| s.profiles.clone()).unwrap_or_default(),
            // A runtime down now has an unknown count, not the one it had at its last answer.
            worker_count: summary.filter(|_| reachable).map(|s| s.worker_count),
            health,
        }
    }
}

/// What browsers may do with a worker now.
#[derive(Debug, Serialize)]
pub struct WorkerCapabilities {
    can_accept_input: bool,
    can_stream_events: bool,
    can_stop: bool,
    can_cancel: bool,
    can_read_transcript: bool,
}

/// `WorkerSummary` of the gateway API.
#[derive(Debug, Serialize)]
pub struct WorkerView {
    runtime_id: String,
    worker_id: String,
    label: String,
    profile: String,
    intent: Intent,
    status: WorkerStatus,
    activity: Option<Activity>,
    transcript_len: u64,
    last_event_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_activity_at: Option<String>,
    capabilities: WorkerCapabilities,
}

fn profile_name(profile: &ProfileRef) -> String {
    profile.name().unwrap_or("default").to_owned()
}

impl WorkerView {
    /// From a list row; `runtime_id` is the gateway's id for the runtime.
    pub fn from_summary(runtime_id: &str, w: WorkerSummary) -> WorkerView {
        let running = w.status == WorkerStatus::Running;
        WorkerView {
            runtime_id: runtime_id.to_owned(),
            label: w.intent.label(),
            profile: profile_name(&w.profile),
            worker_id: w.worker_id,
            intent: w.intent,
            status: w.status,
            activity: w.activity,
            transcript_len: w.transcript_len,
            last_event_id: w.last_event_id,
            created_at: w.created_at,
            last_activity_at: w.last_activity_at,
            capabilities: WorkerCapabilities {
                can_accept_input: running,
                can_stream_events: true,
                can_stop: running,
                can_cancel: running,
                can_read_transcript: true,
            },
        }
    }

    /// From a detail (create, get).
    pub fn from_detail(runtime_id: &str, w: WorkerDetail) -> WorkerView {
        Self::from_summary(runtime_id, w.summary())
    }
}

/// The `ack` of input, stop and cancel.
#[derive(Debug, Serialize)]
pub struct AckView {
    runtime_id: String,
    worker_id: String,
    status: WorkerStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    transcript_sequence: Option<u64>,
    event_id: u64,
}

impl AckView {
    /// From an input ack.
    pub fn input(runtime_id: &str, worker_id: &str, ack: InputAck) -> AckView {
        AckView {
            runtime_id: runtime_id.to_owned(),
            worker_id: worker_id.to_owned(),
            status: ack.status,
            transcript_sequence: Some(ack.transcript_sequence),
            event_id: ack.event_id,
        }
    }

    /// From a stop/cancel ack.
    pub fn lifecycle(runtime_id: &str, worker_id: &str, ack: LifecycleAck) -> AckView {
        AckView {
            runtime_id: runtime_id.to_owned(),
            worker_id: worker_id.to_owned(),
            status: ack.status,
            transcript_sequence: None,
            event_id: ack.event_id,
        }
    }
}

/// One transcript item as browsers see it.
#[derive(Debug, Serialize)]
pub struct TranscriptItemView {
    sequence: u64,
    role: Role,
    content: String,
    event_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<String>,
}

/// `Transcript` of the gateway API.
#[derive(Debug, Serialize)]
pub struct TranscriptView {
    runtime_id: String,
    worker_id: String,
    start: u64,
    limit: u64,
    total_items: u64,
    next_start: Option<u64>,
    items: Vec<TranscriptItemView>,
}

impl TranscriptView {
    /// From the wire transcript.
    pub fn new(runtime_id: &str, worker_id: &str, t: Transcript) -> TranscriptView {
        TranscriptView {
            runtime_id: runtime_id.to_owned(),
            worker_id: worker_id.to_owned(),
            start: t.start,
            limit: t.limit,
            total_items: t.total_items,
            next_start: t.next_start,
            items: t
                .items
                .into_iter()
                .map(|i| TranscriptItemView {
                    sequence: i.sequence,
                    role: i.author(),
                    content: i.content,
                    event_id: i.event_id,
                    at: i.at,
                })
                .collect(),
        }
    }
}

/// `POST /api/runtimes/{rid}/workers` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Profile name (default: the runtime's default profile).
    pub profile: Option<String>,
    /// Intent (default: `{"kind":"assistant"}`).
    #[serde(default, deserialize_with = "strict_intent")]
    pub intent: Option<Intent>,
}

/// An intent as a browser or script writes it. The Runtime API ignores unknown fields for
/// compatibility; here a field its kind does not have is an error, as at the top of the body
/// (`{"kind":"task","objectve":"x"}` would otherwise lose its objective in silence). Serde
/// cannot deny unknown fields inside an internally tagged enum, hence the kinds' fields here.
fn strict_intent<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Intent>, D::Error> {
    use serde::de::Error;
    let value = serde_json::Value::deserialize(deserializer)?;
    let Some(object) = value.as_object() else {
        return match value.is_null() {
            true => Ok(None),
            false => Err(D::Error::custom("expected an intent object with a `kind`: assistant, task or role")),
        };
    };
    let fields: &'static [&'static str] = match object.get("kind").map(serde_json::Value::as_str) {
        None => return Err(D::Error::missing_field("kind")),
        Some(Some("assistant")) => &["kind", "purpose"],
        Some(Some("task")) => &["kind", "objective"],
        Some(Some("role")) => &["kind", "role", "purpose"],
        Some(_) => return Err(D::Error::custom("`kind` must be assistant, task or role")),
    };
    if let Some(unknown) = object.keys().find(|key| !fields.contains(&key.as_str())) {
        return Err(D::Error::unknown_field(unknown, fields));
    }
    Intent::deserialize(value).map(Some).map_err(D::Error::custom)
}

/// `POST …/input` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputBody {
    /// The text.
    pub content: String,
    /// `user` (default) or `system`.
    #[serde(default = "user_kind")]
    pub kind: InputKind,
}

fn user_kind() -> InputKind {
    InputKind::User
}

/// `POST …/stop` and `…/cancel` body (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndBody {
    /// Why.
    pub reason: Option<String>,
}
