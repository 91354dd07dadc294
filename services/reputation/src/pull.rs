//! The pull loop both JetStream consumers of this service share (ingest reports, outcome events).

use async_nats::jetstream::consumer::pull::Stream;
use async_nats::jetstream::consumer::PullConsumer;

use crate::Shared;

/// The consumer's message stream; a failed pull is logged and retried after `nak_delay`. `None` once
/// the service is stopping.
pub(crate) async fn messages(
    shared: &Shared,
    consumer: &PullConsumer,
    name: &str,
    what: &str,
) -> Option<Stream> {
    while !shared.stop.is_cancelled() {
        match consumer.messages().await {
            Ok(messages) => return Some(messages),
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, "cannot pull {what}; retrying");
                tokio::select! {
                    () = shared.stop.cancelled() => return None,
                    () = tokio::time::sleep(shared.options.nak_delay) => {}
                }
            }
        }
    }
    None
}
