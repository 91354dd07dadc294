//! Admission of one exec: route it and take its primary's slot in one step, or wait in the model's
//! queue ([`crate::queue`]) for a freed slot until the request's deadline, or refuse it (`overloaded`
//! with `retry_after_ms`, `no_eligible_nodes`, `unknown_model`). A refusal records nothing and moves
//! no node's reputation: it is not an outcome.

use deepnode_bus::envelope::Reply;
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::scoring::RouteDecision;

use crate::live::InFlight;
use crate::queue::{self, Priority};
use crate::route::NoRoute;
use crate::Scheduler;

impl Scheduler {
    /// Admits one exec: routes it and takes its primary's slot in one step (under `admission`, so
    /// concurrent requests never share a node's last slot). When every replica that could serve is
    /// at capacity — or others already wait for this model — the request joins the model's queue
    /// ([`queue`]: critical first, then callers in turn, then earliest deadline) and routes again
    /// when it is first and a slot frees, until `deadline`. Refused `overloaded` when no slot frees in time, when
    /// the policy's `exec.queue_limit` requests already wait, or at once when it is `sheddable`.
    pub(crate) async fn admit(
        &self,
        model_id: &ModelId,
        request_id: &RequestId,
        caller: Option<&str>,
        priority: Priority,
        deadline: tokio::time::Instant,
    ) -> Result<(RouteDecision, InFlight), Reply> {
        // Only once this copy knows the others does it know its share of each node's capacity.
        self.live.settled().await;
        let mut caught_up = false;
        let mut queued: Option<queue::Queued> = None;
        let waiting_since = tokio::time::Instant::now();
        let refuse = |why: NoRoute| {
            let reply = self.refusal(why, model_id);
            if let Reply::Err { error, .. } = &reply {
                metrics::counter!("deepnode_exec_refusals_total", "code" => error.code.as_str(), "priority" => priority.as_str())
                    .increment(1);
            }
            reply
        };
        loop {
            let freed = self.live.slot_freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let my_turn = match &queued {
                None => self.queues.is_empty(model_id),
                Some(place) => place.is_first(),
            };
            if my_turn {
                let routed = {
                    let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
                    self.route_now(model_id, request_id, self.options.clock.now())
                        .map(|decision| {
                            let slot = self.live.begin(&decision.primary);
                            (decision, slot)
                        })
                };
                match routed {
                    Ok(admitted) => {
                        if let Some(place) = queued {
                            place.start();
                            metrics::histogram!("deepnode_exec_queue_wait_seconds", "model_id" => model_id.to_string())
                                .record(waiting_since.elapsed().as_secs_f64());
                        }
                        return Ok(admitted);
                    }
                    Err(NoRoute::UnknownModel) if !caught_up => {
                        caught_up = true;
                        self.catch_up().await;
                        continue;
                    }
                    Err(NoRoute::Busy) => {}
                    Err(other) => return Err(refuse(other)),
                }
            }
            if queued.is_none() {
                if priority == Priority::Sheddable {
                    return Err(refuse(NoRoute::Busy));
                }
                match self.queues.join(
                    model_id,
                    caller,
                    priority,
                    deadline,
                    self.ctx.policy.exec.queue_limit,
                ) {
                    Some(place) => queued = Some(place),
                    None => return Err(refuse(NoRoute::Busy)),
                }
                continue; // first already? look again at once
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(refuse(NoRoute::Busy));
            }
        }
    }

    /// The reply refusing a request that could not be routed; `overloaded` suggests when to retry.
    pub(crate) fn refusal(&self, why: NoRoute, model_id: &ModelId) -> Reply {
        let error = why.to_error(model_id);
        if why == NoRoute::Busy {
            let retry_after_ms = self.ctx.policy.exec.overload_retry_after_ms;
            return Reply::err_with(
                error,
                &serde_json::json!({ "retry_after_ms": retry_after_ms }),
            );
        }
        Reply::err(error)
    }
}
