//! Wire types of the Runtime API (runtime-api.md), shared by the engine, the Runtime API
//! server and the remote client. Extension fields are optional when parsing, so a runtime
//! that sends only the base shapes is understood; unknown fields are ignored.

use serde::{Deserialize, Serialize};

/// `{"runtime_id","worker_id"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRef {
    /// The runtime's own id.
    pub runtime_id: String,
    /// The worker's id, local to its runtime.
    pub worker_id: String,
}

/// Why a worker exists, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", expecting = "an intent object with a `kind`: assistant, task or role")]
pub enum Intent {
    /// A general assistant.
    Assistant {
        /// Optional purpose.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purpose: Option<String>,
    },
    /// A task with an objective.
    Task {
        /// What the task is for.
        objective: String,
    },
    /// A role with an optional purpose.
    Role {
        /// The role's name.
        role: String,
        /// Optional purpose.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purpose: Option<String>,
    },
}

impl Intent {
    /// A short human label: the objective, role or purpose.
    pub fn label(&self) -> String {
        match self {
            Intent::Assistant { purpose } => purpose.clone().unwrap_or_else(|| "assistant".to_owned()),
            Intent::Task { objective } => objective.clone(),
            Intent::Role { role, purpose } => match purpose {
                Some(p) => format!("{role}: {p}"),
                None => role.clone(),
            },
        }
    }
}

/// Which profile a worker runs, adjacently tagged (`{"kind":"named","value":"echo"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    content = "value",
    rename_all = "snake_case",
    expecting = "a profile object with a `kind`: runtime_default or named (with a `value`)"
)]
pub enum ProfileRef {
    /// The runtime's default profile.
    RuntimeDefault,
    /// A configured profile by name.
    Named(String),
    /// `builtin:<name>`, treated as profile `<name>`.
    Builtin(String),
}

impl ProfileRef {
    /// The profile name this reference selects (`None` for the runtime default).
    pub fn name(&self) -> Option<&str> {
        match self {
            ProfileRef::RuntimeDefault => None,
            ProfileRef::Named(name) => Some(name),
            ProfileRef::Builtin(name) => Some(name.strip_prefix("builtin:").unwrap_or(name)),
        }
    }
}

/// A worker's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStatus {
    /// Accepts input.
    Running,
    /// Stopped gracefully; terminal.
    Stopped,
    /// Cancelled; terminal.
    Cancelled,
}

impl WorkerStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Running => "running",
            WorkerStatus::Stopped => "stopped",
            WorkerStatus::Cancelled => "cancelled",
        }
    }
}

/// Whether a turn is in progress (extension field `activity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// No turn in progress.
    Idle,
    /// A turn is running.
    Busy,
}

/// `config_bundle` of a create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigBundle {
    /// Bundle id.
    pub id: String,
}

/// One requested capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedCapability {
    /// Capability name.
    pub name: String,
    /// Why it is requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A named reference (`workspace_refs`, `mount_refs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedRef {
    /// Name.
    pub name: String,
    /// Reference.
    pub reference: String,
}

/// Optional create fields, accepted and echoed back when present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateExtras {
    /// Config bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_bundle: Option<ConfigBundle>,
    /// Requested capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_capabilities: Option<Vec<RequestedCapability>>,
    /// Workspace references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_refs: Option<Vec<NamedRef>>,
    /// Mount references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_refs: Option<Vec<NamedRef>>,
}

impl CreateExtras {
    /// Drops empty lists, so they are omitted from responses.
    pub fn normalized(mut self) -> Self {
        let none_if_empty = |v: Option<Vec<_>>| v.filter(|v: &Vec<_>| !v.is_empty());
        self.requested_capabilities = self.requested_capabilities.filter(|v| !v.is_empty());
        self.workspace_refs = none_if_empty(self.workspace_refs);
        self.mount_refs = none_if_empty(self.mount_refs);
        self
    }
}

/// `POST /v1/workers` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateWorker {
    /// Why the worker exists.
    pub intent: Intent,
    /// Which profile it runs.
    pub profile: ProfileRef,
    /// Optional fields echoed back.
    #[serde(flatten)]
    pub extras: CreateExtras,
    /// Extension: the `Idempotency-Key` header, so a repeated create returns the same worker.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

/// A list row of `GET /v1/workers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSummary {
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Runtime id.
    pub runtime_id: String,
    /// Worker id.
    pub worker_id: String,
    /// Lifecycle status.
    pub status: WorkerStatus,
    /// Intent.
    pub intent: Intent,
    /// Profile.
    pub profile: ProfileRef,
    /// Number of requested capabilities.
    #[serde(default)]
    pub requested_capability_count: u64,
    /// Whether a config bundle was given.
    #[serde(default)]
    pub has_config_bundle: bool,
    /// Transcript length.
    #[serde(default)]
    pub transcript_len: u64,
    /// Last event id of this worker.
    #[serde(default)]
    pub last_event_id: u64,
    /// Extension: idle or busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
    /// Extension: when the worker was created (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Extension: when its transcript last grew (else when it was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
}

/// `{"worker": …}` of create and get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerDetail {
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Runtime id.
    pub runtime_id: String,
    /// Worker id.
    pub worker_id: String,
    /// Lifecycle status.
    pub status: WorkerStatus,
    /// Intent.
    pub intent: Intent,
    /// Profile.
    pub profile: ProfileRef,
    /// Optional create fields.
    #[serde(flatten)]
    pub extras: CreateExtras,
    /// Transcript length.
    #[serde(default)]
    pub transcript_len: u64,
    /// Last event id of this worker.
    #[serde(default)]
    pub last_event_id: u64,
    /// Extension: idle or busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<Activity>,
    /// Extension: when the worker was created (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Extension: when its transcript last grew (else when it was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<String>,
}

impl WorkerDetail {
    /// The list-row form of this worker.
    pub fn summary(&self) -> WorkerSummary {
        WorkerSummary {
            worker_ref: self.worker_ref.clone(),
            runtime_id: self.runtime_id.clone(),
            worker_id: self.worker_id.clone(),
            status: self.status,
            intent: self.intent.clone(),
            profile: self.profile.clone(),
            requested_capability_count: self.extras.requested_capabilities.as_ref().map_or(0, |c| c.len() as u64),
            has_config_bundle: self.extras.config_bundle.is_some(),
            transcript_len: self.transcript_len,
            last_event_id: self.last_event_id,
            activity: self.activity,
            created_at: self.created_at.clone(),
            last_activity_at: self.last_activity_at.clone(),
        }
    }
}

/// Runtime limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeLimits {
    /// Largest transcript page.
    pub max_transcript_projection_items: u64,
    /// Largest event batch.
    pub max_event_batch_items: u64,
}

/// `{"runtime": …}` of `GET /v1/runtime`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSummary {
    /// The runtime's own id.
    pub runtime_id: String,
    /// Display name (`null` when unset).
    pub display_name: Option<String>,
    /// `memory` | `fs_store`.
    pub backend: String,
    /// `running` | `stopped`.
    pub status: String,
    /// Workers in total.
    pub worker_count: u64,
    /// Running workers.
    #[serde(default)]
    pub active_worker_count: u64,
    /// Stopped workers.
    #[serde(default)]
    pub stopped_worker_count: u64,
    /// Cancelled workers.
    #[serde(default)]
    pub cancelled_worker_count: u64,
    /// Diagnostics raised.
    #[serde(default)]
    pub diagnostic_count: u64,
    /// Limits.
    pub limits: RuntimeLimits,
    /// Extension: changes on every process start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Extension: profile names a create may select.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiles: Option<Vec<String>>,
    /// Extension: live event subscriptions open now (each gateway relay is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_subscribers: Option<u64>,
}

/// Kind of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A user message: runs a turn.
    User,
    /// A system message: recorded, runs no turn.
    System,
}

/// `POST /v1/workers/{id}/input` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInput {
    /// `user` | `system`.
    pub kind: InputKind,
    /// The text.
    pub content: String,
    /// Extension: the `Idempotency-Key` header, so a repeated input returns the first ack.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

/// `{"ack": …}` of input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputAck {
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Status after the input.
    pub status: WorkerStatus,
    /// Transcript sequence of the stored input.
    pub transcript_sequence: u64,
    /// Event id of the input.
    pub event_id: u64,
}

/// `{"ack": …}` of stop and cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleAck {
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Status after the call.
    pub status: WorkerStatus,
    /// Event id of the change (or the last event, when nothing changed).
    pub event_id: u64,
}

/// Who wrote a transcript entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// User input.
    User,
    /// System input or runtime notes (stderr, restarts).
    System,
    /// Extension: a turn's output.
    Assistant,
}

/// One transcript entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptItem {
    /// Per-worker sequence, from 1.
    pub sequence: u64,
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The event that recorded it.
    pub event_id: u64,
    /// Extension: when it was recorded (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Added for base clients: `assistant` on an entry served as role `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl TranscriptItem {
    /// The entry for a client that did not opt in: role `assistant` becomes `system` with
    /// `"origin":"assistant"`.
    pub fn for_base(&self) -> TranscriptItem {
        let mut item = self.clone();
        if item.role == Role::Assistant {
            item.role = Role::System;
            item.origin = Some("assistant".to_owned());
        }
        item
    }

    /// Who wrote it, with a base runtime's `system` + `origin: assistant` read as assistant.
    pub fn author(&self) -> Role {
        match (self.role, self.origin.as_deref()) {
            (Role::System, Some("assistant")) => Role::Assistant,
            (role, _) => role,
        }
    }
}

/// `{"transcript": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    /// Identity.
    pub worker_ref: WorkerRef,
    /// Offset of the first item.
    pub start: u64,
    /// Page size asked for.
    pub limit: u64,
    /// Entries in total.
    pub total_items: u64,
    /// The page.
    pub items: Vec<TranscriptItem>,
    /// Offset of the next page, `null` when none remain.
    pub next_start: Option<u64>,
}

/// A segment of a message event, tagged by `kind` (journals written before the base shape
/// was adopted said `type` and `text`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Always `text`.
    #[serde(alias = "type")]
    pub kind: String,
    /// The text.
    #[serde(alias = "text")]
    pub content: String,
}

impl Segment {
    /// A text segment.
    pub fn text(text: &str) -> Segment {
        Segment { kind: "text".to_owned(), content: text.to_owned() }
    }
}

/// Base `turn_end.result`: a turn that ended in any way is `finished`; `outcome` says how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnResult {
    /// The turn is over (journals written before `outcome` existed said how in its place).
    #[serde(alias = "completed", alias = "cancelled", alias = "failed")]
    Finished,
}

/// Extension `turn_end.outcome`: how a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnOutcome {
    /// Finished normally.
    Completed,
    /// Aborted by cancel (or stop past its grace).
    Cancelled,
    /// The profile failed.
    Failed,
    /// Cut short by a restart or shutdown of the runtime.
    Interrupted,
}

/// `status` event data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    /// No turn running.
    Idle,
    /// A turn is running.
    Running,
}

/// An event payload: `{"event": snake_case, "data": {…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum EventPayload {
    /// Extension: the runtime process started.
    RuntimeStarted {
        /// The new boot id.
        boot_id: String,
    },
    /// Extension: a worker was created, stopped or cancelled.
    Lifecycle {
        /// The new status.
        status: WorkerStatus,
        /// Why, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A user input was accepted.
    UserMessage {
        /// Its text.
        segments: Vec<Segment>,
        /// Added field: when the transcript entry it records was recorded (RFC 3339, UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
    /// A system input was accepted: `item` is `{"kind":"text","content":…}`.
    SystemItem {
        /// What was recorded.
        item: serde_json::Value,
        /// Added field: when the transcript entry it records was recorded (RFC 3339, UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
    /// A system input, as journals written before `system_item` recorded it (never published
    /// any more; served as `system_item`).
    SystemMessage {
        /// Its text.
        segments: Vec<Segment>,
    },
    /// A turn started.
    TurnStart {
        /// Turn number, per worker from 1.
        turn: u64,
    },
    /// Output produced.
    TextDelta {
        /// The new text.
        text: String,
    },
    /// The turn's whole output.
    TextDone {
        /// All output of the turn.
        text: String,
        /// Added field: when the transcript entry it records was recorded (RFC 3339, UTC).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
    /// A turn ended.
    TurnEnd {
        /// Turn number.
        turn: u64,
        /// Always `finished` (the base vocabulary).
        result: TurnResult,
        /// Extension: how it ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<TurnOutcome>,
    },
    /// Turn activity changed.
    Status {
        /// `idle` | `running`.
        status: TurnStatus,
    },
    /// Something went wrong in a turn.
    Error {
        /// A base code (`tool_error` for a failed or timed-out command).
        code: String,
        /// Explanation.
        message: String,
        /// Extension: the finer code (`exit_status`, `turn_timeout`…).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The runtime is shutting down.
    Shutdown,
    /// The first frame of a WebSocket session: the worker's state (never journaled).
    Snapshot(Box<SnapshotData>),
}

/// Error codes of the base event vocabulary.
const BASE_ERROR_CODES: &[&str] =
    &["already_running", "not_running", "not_paused", "provider_error", "tool_error", "invalid_request", "internal"];

impl EventPayload {
    /// Sets when the transcript entry this event records was recorded (events that record
    /// none have no such field).
    pub fn set_recorded_at(&mut self, when: Option<String>) {
        match self {
            EventPayload::UserMessage { at, .. }
            | EventPayload::SystemItem { at, .. }
            | EventPayload::TextDone { at, .. } => *at = when,
            _ => {}
        }
    }

    /// The payload in the base vocabulary, for a client that did not opt in to extensions
    /// (`X-Worker-Runtime-Extensions: 1`): extension events become `system_item`s, error
    /// codes base codes, assistant entries `system` ones. `None`: not sent at all.
    pub fn for_base(&self) -> Option<std::borrow::Cow<'_, EventPayload>> {
        use std::borrow::Cow;
        let item = |item: serde_json::Value| Some(Cow::Owned(EventPayload::SystemItem { item, at: None }));
        match self {
            EventPayload::RuntimeStarted { .. } => None,
            EventPayload::Lifecycle { status, reason } => {
                item(serde_json::json!({"kind": "lifecycle", "status": status, "reason": reason}))
            }
            EventPayload::SystemMessage { segments } => {
                let content: String = segments.iter().map(|s| s.content.as_str()).collect();
                item(serde_json::json!({"kind": "text", "content": content}))
            }
            EventPayload::Error { code, message, detail } if !BASE_ERROR_CODES.contains(&code.as_str()) => {
                Some(Cow::Owned(EventPayload::Error {
                    code: "tool_error".to_owned(),
                    message: message.clone(),
                    detail: detail.clone().or_else(|| Some(code.clone())),
                }))
            }
            EventPayload::Snapshot(data) => {
                let entries = data.entries.iter().map(TranscriptItem::for_base).collect();
                Some(Cow::Owned(EventPayload::Snapshot(Box::new(SnapshotData { entries, ..(**data).clone() }))))
            }
            _ => Some(Cow::Borrowed(self)),
        }
    }
}

/// `snapshot` event data: the worker's state when a session subscribed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotData {
    /// The latest transcript entries (at most one page).
    pub entries: Vec<TranscriptItem>,
    /// Who is talking.
    pub greeting: Greeting,
    /// `idle` | `running`.
    pub status: TurnStatus,
}

/// Who is talking, in a snapshot: the base greeting fields, then this runtime's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// Base: the worker's name (its id).
    #[serde(default)]
    pub worker_name: String,
    /// Base: the working directory (empty: none).
    #[serde(default)]
    pub cwd: String,
    /// Base: who provides the model (`worker-gateway`).
    #[serde(default)]
    pub provider: String,
    /// Base: the model (the profile's name).
    #[serde(default)]
    pub model: String,
    /// Base: what the worker is for (its intent's label).
    #[serde(default)]
    pub scope_summary: String,
    /// Base: tools (none).
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    /// Base: context window (0: not a language model).
    #[serde(default)]
    pub context_window: u64,
    /// Base: context tokens in use.
    #[serde(default)]
    pub context_tokens: u64,
    /// The runtime's own id.
    pub runtime_id: String,
    /// The worker.
    pub worker_id: String,
    /// Its lifecycle status.
    pub worker_status: WorkerStatus,
    /// Extension: the runtime process's boot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Extension: whether cursors survive a restart of the runtime (fs store).
    #[serde(default)]
    pub durable_cursors: bool,
    /// Extension: for a session opened with a cursor, whether it was honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_honoured: Option<bool>,
    /// Extension: the fs store's id; event ids (cursors) count within it across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
}

/// One published event with its runtime-global sequence (= event id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Runtime-global sequence, strictly increasing per worker.
    pub seq: u64,
    /// The worker, or `None` for runtime-level events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// What happened.
    pub payload: EventPayload,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn profile_refs_are_adjacently_tagged() {
        let d: ProfileRef = serde_json::from_value(json!({"kind":"runtime_default"})).unwrap();
        assert_eq!(d, ProfileRef::RuntimeDefault);
        assert_eq!(serde_json::to_value(&d).unwrap(), json!({"kind":"runtime_default"}));
        let b: ProfileRef = serde_json::from_value(json!({"kind":"builtin","value":"builtin:echo"})).unwrap();
        assert_eq!(b.name(), Some("echo"));
    }

    #[test]
    fn base_shapes_parse_without_extensions() {
        let w: WorkerDetail = serde_json::from_value(json!({
            "worker_ref":{"runtime_id":"rt","worker_id":"w"},"runtime_id":"rt","worker_id":"w",
            "status":"running","intent":{"kind":"task","objective":"x"},
            "profile":{"kind":"named","value":"echo"},"transcript_len":2,"last_event_id":7}))
        .unwrap();
        assert_eq!(w.activity, None);
        let r: RuntimeSummary = serde_json::from_value(json!({
            "runtime_id":"rt","display_name":null,"backend":"memory","status":"running",
            "worker_count":0,"active_worker_count":0,"stopped_worker_count":0,
            "cancelled_worker_count":0,"diagnostic_count":0,
            "limits":{"max_transcript_projection_items":256,"max_event_batch_items":256}}))
        .unwrap();
        assert_eq!(r.boot_id, None);
        assert_eq!(serde_json::to_value(&r).unwrap()["display_name"], json!(null));
    }

    #[test]
    fn payloads_match_the_wire() {
        let unit = serde_json::to_value(EventPayload::Shutdown).unwrap();
        assert_eq!(unit, json!({"event":"shutdown"}));
        let delta = serde_json::to_value(EventPayload::TextDelta { text: "hi".into() }).unwrap();
        assert_eq!(delta, json!({"event":"text_delta","data":{"text":"hi"}}));
    }
}
