//! A relay's upstream loop: it reads the runtime's stream into the relay ([`pump`]), and
//! when the connection ends reconnects with backoff, resuming after the last event relayed,
//! and tells the subscribers how that went (`reconnecting`, `resumed`, `reset`, gone).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Hub, Opened, Relay, stream_frame};
use crate::runtime::frames::diagnostic_frame;
use crate::runtime::handle::{EventSource, RuntimeError, SourceItem, StreamEnded};
use crate::runtime::remote::large_frames_wanted;

/// How one upstream connection ended.
enum Ended {
    /// No subscribers left.
    Idle,
    /// The worker no longer exists (or its id now names another worker).
    WorkerGone(&'static str),
    /// The connection broke: reconnect.
    Broken,
    /// The runtime sent a frame the relay cannot read (why): reconnect, and say so once.
    Unreadable(String),
    /// A frame too large to keep its memory for went through at least [`OUTGROWN_QUIET`] ago
    /// (at once when other relays wait for such memory) and the stream is quiet: the
    /// connection's read buffer stays as large as that frame for as long as it lives, so it
    /// is replaced, resuming after the last event (a runtime that honours cursors only).
    Outgrown,
}

/// How long after its last large event a connection is replaced: a runtime that sends large
/// events often keeps its buffer in use, and is not reconnected for each.
const OUTGROWN_QUIET: Duration = Duration::from_secs(2);

pub(super) fn run_upstream(hub: &Hub, relay: &Relay, first: Box<dyn EventSource>) {
    let mut source = Some(first);
    let mut attempt = 0u32;
    let mut outage_told = false;
    loop {
        let position = relay.lock().last_seq;
        let ended = match source.take() {
            Some(mut open) => pump(hub, relay, open.as_mut(), false, false),
            None => {
                let resume = relay.lock().last_seq;
                match relay.open(resume, hub.options.open_timeout) {
                    Ok(opened) => {
                        let was_told = std::mem::take(&mut outage_told);
                        relay.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        relay.lock().honours_cursors = opened.honoured;
                        let gone = resumed(relay, &opened, was_told);
                        if was_told {
                            let how = match gone {
                                Some(why) => why,
                                None if !opened.honoured => "the runtime could not resume: events in between are lost",
                                None => "resumed after the last event relayed",
                            };
                            log::warn!(
                                "runtime `{}`: the event stream of worker `{}` is connected again; {how}",
                                relay.runtime_id,
                                relay.worker_id
                            );
                        }
                        match gone {
                            Some(gone) => Ended::WorkerGone(gone),
                            None => {
                                let reset_told = !opened.honoured;
                                let mut open = opened.source;
                                pump(hub, relay, open.as_mut(), true, reset_told)
                            }
                        }
                    }
                    Err(RuntimeError::WorkerNotFound) => {
                        let why = "the worker no longer exists on its runtime";
                        if std::mem::take(&mut outage_told) {
                            log::warn!(
                                "runtime `{}`: the event stream of worker `{}` ended: {why}",
                                relay.runtime_id,
                                relay.worker_id
                            );
                        }
                        Ended::WorkerGone(why)
                    }
                    Err(e) => {
                        log::debug!("relay {}/{}: upstream unavailable: {e}", relay.runtime_id, relay.worker_id);
                        Ended::Broken
                    }
                }
            }
        };
        // However the pump ended, what it published reaches its subscribers now.
        relay.wake_queued();
        // Only a connection that carried events and did not end at a frame the relay cannot
        // read resets the backoff: one that breaks at an unreadable frame every time (the
        // same one, or a new one after each readable event) is not retried in a tight loop.
        if relay.lock().last_seq > position && !matches!(ended, Ended::Unreadable(_)) {
            attempt = 0;
        }
        let unreadable = match ended {
            Ended::Idle => return,
            Ended::Outgrown => {
                log::debug!("relay {}/{}: replacing a connection grown large", relay.runtime_id, relay.worker_id);
                continue;
            }
            Ended::WorkerGone(why) => return relay.finish(hub, diagnostic_frame("backend.worker_not_found", why)),
            Ended::Broken => None,
            Ended::Unreadable(why) => Some(why),
        };
        if relay.lock().ended {
            return; // the gateway is shutting down: nothing to reconnect, nothing to warn of
        }
        if let Some(why) = unreadable {
            relay.stuck(&why);
        } else if !outage_told {
            // Once per outage; the attempts in between log at debug.
            log::warn!(
                "runtime `{}`: lost the event stream of worker `{}`; reconnecting",
                relay.runtime_id,
                relay.worker_id
            );
            relay.broadcast(&stream_frame("reconnecting", "lost the runtime's event stream; reconnecting"));
            outage_told = true;
        }
        let wait = backoff(attempt, hub.options.backoff_cap);
        attempt = attempt.saturating_add(1);
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if relay.should_end(hub) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
        }
    }
}

/// Tells subscribers how a reconnection went: `resumed` (no event missed; only after they were
/// told `reconnecting`), `reset` (the runtime no longer holds what came in between), or —
/// when the runtime's lineage changed (a memory runtime restarted, a store was replaced) —
/// that this id no longer names the worker they watched.
fn resumed(relay: &Relay, opened: &Opened, reconnecting_told: bool) -> Option<&'static str> {
    let tag = relay.lock().tag;
    if tag != Some(opened.tag) || (!opened.honoured && opened.cannot_tell_restarts) {
        return Some(replaced(relay));
    }
    if !opened.honoured {
        relay.reset(opened.position, "the runtime could not resume from our cursor; events in between are lost");
    } else if reconnecting_told {
        // A frame still unreadable after this is told again, not left behind a "resumed".
        relay.lock().stuck = None;
        let detail = if opened.cannot_tell_restarts {
            "the runtime's event stream is back, resumed after the last event seen (this runtime does not \
             say whether it restarted meanwhile)"
        } else {
            "the runtime's event stream is back; no event was missed"
        };
        relay.broadcast(&stream_frame("resumed", detail));
    }
    None
}

/// A runtime without durable events came back unable to resume: it restarted (a base
/// runtime's memory store even hands the same id to a new worker), so the stream says the
/// worker was replaced or is gone, and ends rather than show another worker's events.
fn replaced(relay: &Relay) -> &'static str {
    relay.broadcast(&stream_frame(
        "reset",
        "the runtime restarted without keeping its events: the worker was replaced or is gone",
    ));
    "the runtime came back without this stream's events: the worker it showed was replaced or is gone"
}

/// Capped exponential backoff with full jitter: uniform in `[0, min(cap, 100 ms × 2^attempt)]`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(cap);
    let fraction = (crate::clock::random_u64() % 10_000) as f64 / 10_000.0;
    ceiling.mul_f64(fraction)
}

/// Events published before subscribers are woken even if the upstream has more ready.
const MAX_BATCH: usize = 64;

/// Relays `source` until it ends; `reconnected` when it is not the relay's first connection,
/// `reset_told` when its subscribers were told of a reset as it opened (the runtime could not
/// resume from the relay's cursor, which it may say again in a diagnostic: not a second gap).
fn pump(hub: &Hub, relay: &Relay, source: &mut dyn EventSource, reconnected: bool, mut reset_told: bool) -> Ended {
    // Events published since subscribers were last woken (see [`Relay::wake_queued`]).
    let mut unwoken = 0;
    loop {
        // Take what is ready without waiting while a batch is open; wake before any wait.
        let batching = unwoken > 0 && unwoken < MAX_BATCH;
        if unwoken > 0 && !batching {
            relay.wake_queued();
            unwoken = 0;
        }
        let item = source.next(if batching { Duration::ZERO } else { Duration::from_millis(250) });
        if batching && !matches!(item, Ok(Some(_))) {
            relay.wake_queued();
            unwoken = 0;
            if matches!(item, Ok(None)) {
                continue;
            }
        }
        match item {
            Ok(Some(SourceItem::Snapshot { .. })) => {} // only the first item of a connection
            Ok(Some(SourceItem::Event { seq, payload })) => {
                if !relay.publish(&hub.options, seq, &payload) {
                    // Replayed or live, a runtime's events come in rising order.
                    return Ended::Unreadable("an event whose id is not above the last one relayed".into());
                }
                unwoken += 1;
                reset_told = false;
            }
            Ok(Some(SourceItem::Diagnostic { code, message })) => match code.as_str() {
                "runtime.worker_not_found" => return Ended::WorkerGone("the worker no longer exists on its runtime"),
                "runtime.cursor_unknown_or_expired" => {
                    let (position, cannot_tell_restarts) = {
                        let st = relay.lock();
                        (st.last_seq, st.cannot_tell_restarts)
                    };
                    if reconnected && cannot_tell_restarts {
                        return Ended::WorkerGone(replaced(relay));
                    }
                    if !std::mem::take(&mut reset_told) {
                        relay.reset(
                            position,
                            "the runtime could not resume from our cursor; events in between are lost",
                        );
                    }
                }
                _ => {
                    let code = format!("backend.{}", code.strip_prefix("runtime.").unwrap_or(&code));
                    relay.broadcast(&diagnostic_frame(&code, &message));
                }
            },
            Ok(None) => {
                if relay.should_end(hub) {
                    return Ended::Idle;
                }
                let outgrown = source.outgrown_since();
                if outgrown.is_some_and(|at| at.elapsed() > OUTGROWN_QUIET || large_frames_wanted()) {
                    if relay.lock().honours_cursors {
                        return Ended::Outgrown;
                    }
                    source.keep_outgrown();
                }
            }
            Err(end) => {
                log::debug!("relay {}/{}: upstream ended: {end}", relay.runtime_id, relay.worker_id);
                return match end {
                    StreamEnded::Broken(_) => Ended::Broken,
                    StreamEnded::Unreadable(why) => Ended::Unreadable(why),
                };
            }
        }
    }
}
