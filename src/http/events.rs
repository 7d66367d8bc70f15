//! The SSE stream of a job: stored events replayed from a sequence number, then live ones.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use tokio::sync::broadcast;

use crate::domain::job::{JobEvent, JobStatus};
use crate::storage::queue::JobQueue;

/// How often a stream re-reads the log when no wake-up arrives (events written by another
/// process on a shared database).
const POLL: Duration = Duration::from_secs(1);

struct StreamState {
    queue: Arc<dyn JobQueue>,
    job_id: String,
    last: i64,
    pending: VecDeque<JobEvent>,
    wake: broadcast::Receiver<String>,
    done: bool,
    /// The API key the stream was opened with: the stream ends once it is revoked or expires.
    key: Option<(crate::storage::keys::KeyStore, String)>,
}

fn is_terminal(e: &JobEvent) -> bool {
    e.kind == "state"
        && serde_json::from_str::<serde_json::Value>(&e.data)
            .ok()
            .and_then(|v| v.get("status").and_then(|s| s.as_str()).and_then(JobStatus::parse))
            .is_some_and(JobStatus::is_terminal)
}

pub fn job_event_stream(
    queue: Arc<dyn JobQueue>,
    job_id: String,
    last: i64,
    key: Option<(crate::storage::keys::KeyStore, String)>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let wake = queue.subscribe();
    let state = StreamState { queue, job_id, last, pending: VecDeque::new(), wake, done: false, key };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                s.last = e.seq;
                // The terminal event is the last one a job writes: end the stream after it.
                s.done = is_terminal(&e);
                let event = Event::default().id(e.seq.to_string()).event(e.kind).data(e.data);
                return Some((Ok(event), s));
            }
            if s.done {
                return None;
            }
            match s.queue.events_after(&s.job_id, s.last).await {
                Ok(events) if !events.is_empty() => {
                    s.pending.extend(events);
                    continue;
                }
                Ok(_) => {
                    // Nothing newer than `last`: a finished job has nothing more to say.
                    if let Ok(Some(job)) = s.queue.get(&s.job_id).await {
                        if job.status().is_terminal() {
                            return None;
                        }
                    }
                    // A key revoked or expired since the stream opened ends it.
                    if let Some((keys, id)) = &s.key {
                        let live = keys.get(id).await.ok().flatten().is_some_and(|k| k.live(crate::storage::now_ms()));
                        if !live {
                            return None;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading job events failed");
                }
            }
            // Wait for this job's next event (or poll); other jobs' wake-ups are skipped.
            let deadline = tokio::time::sleep(POLL);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    msg = s.wake.recv() => match msg {
                        Ok(id) if id == s.job_id => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = &mut deadline => break,
                }
            }
        }
    })
}
