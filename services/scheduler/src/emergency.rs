//! Emergency re-placement requests (POLICY.md "Ejection"): when a model has no healthy replica left,
//! or its last healthy replica keeps failing and may not be ejected while another replica sits on a
//! node that may not serve, the scheduler routes to the least bad replica and asks the rotation
//! service for a round now (`cmd.rotation.run`) instead of waiting for the next epoch. (When every
//! replica is eligible and merely failing, a round would move nothing, so none is asked for.) That round re-places replicas that break a hard rule (an offline,
//! jailed, deregistered or phased-out node) with make-before-break moves, overriding hysteresis and
//! residency.
//!
//! A failing model would ask on every request; [`Emergencies`] lets one process ask at most once per
//! cooldown per model. The request is fire-and-forget: the round's own events are its record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deepnode_domain::ids::ModelId;

/// How often one process may ask for an emergency round for the same model.
pub(crate) const COOLDOWN: Duration = Duration::from_secs(10);

/// When this process last asked for each model.
#[derive(Debug, Default)]
pub(crate) struct Emergencies {
    asked: Mutex<HashMap<ModelId, Instant>>,
}

impl Emergencies {
    /// Whether to ask for `model` at `now`; if so, `now` counts as asked.
    pub(crate) fn should_ask(&self, model: &ModelId, now: Instant) -> bool {
        let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        match asked.get(model) {
            Some(last) if now.duration_since(*last) < COOLDOWN => false,
            _ => {
                asked.insert(model.clone(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ask_per_model_per_cooldown() {
        let e = Emergencies::default();
        let (m1, m2) = (ModelId::parse("m1").unwrap(), ModelId::parse("m2").unwrap());
        let t0 = Instant::now();
        assert!(e.should_ask(&m1, t0));
        assert!(!e.should_ask(&m1, t0 + COOLDOWN / 2), "within the cooldown");
        assert!(e.should_ask(&m2, t0), "another model asks on its own");
        assert!(e.should_ask(&m1, t0 + COOLDOWN), "after the cooldown");
    }
}
