//! One job, one holder across copies: whoever holds an advisory lease (`deepnode_store::Lease`)
//! does the job; every other copy stands by, asking for the lease on a connection of its own, and
//! takes over when the holder's connection — and with it the lock — goes (its process stopped,
//! crashed or lost the database). The relay runs this way. (The reputation service's SQL
//! projection holds its lease the same way but writes its loop out: its standby has work of its own
//! while it waits — keeping its fold current — which [`hold`] has no place for.)

use std::future::Future;
use std::time::Duration;

use deepnode_store::{EventStore, Lease};

use crate::shutdown::Shutdown;

/// Runs `job` while this copy holds the lease `key`, standing by (asking every `retry`) while
/// another copy does. `job` gets the lease and returns `Ok` when it is done for good (the service
/// stopping, or an error it must report), or `Err(reason)` when it lost its footing (the lease, the
/// database): the copy logs the reason and stands by again. Returns `None` if `shutdown` fired
/// while standing by. `job_name` names the job in the log.
pub async fn hold<T, F, Fut>(
    store: &EventStore,
    key: i64,
    retry: Duration,
    shutdown: &Shutdown,
    job_name: &str,
    mut job: F,
) -> Option<T>
where
    F: FnMut(Lease) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    while !shutdown.is_cancelled() {
        let taken = tokio::select! {
            _ = shutdown.cancelled() => return None,
            taken = store.take_lease(key, retry) => taken,
        };
        match taken {
            Ok(lease) => {
                tracing::info!("{job_name} lease taken; this copy does the job");
                match job(lease).await {
                    Ok(done) => return Some(done),
                    Err(reason) => {
                        tracing::warn!(%reason, "{job_name} lost its footing; standing by");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "{job_name} lease unavailable"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(retry) => {}
        }
    }
    None
}
