//! The policy configuration: every number of POLICY.md as a default in one struct tree
//! ([`PolicyConfig`]), overridable from TOML text (the file named by `DEEPNODE_CONFIG`), and its
//! [`PolicyConfig::config_hash`], which every decision record carries so an auditor knows which
//! numbers produced it.
//!
//! Every struct is `#[serde(default)]`: a TOML file names only what it changes. The routing, placement,
//! rotation and ejection sub-policies live next to the code that uses them (`scoring`, `placement`,
//! `rotation`, `ejection`); this module composes them and owns reputation, penalties, liveness and
//! execution. A number that two modules need lives in one place only: probation thresholds in
//! [`PlacementPolicy`], phase-out and immunity in [`RotationPolicy`]. This module does not read files
//! or the environment — the runtime passes the text in.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ejection::EjectionPolicy;
use crate::fixed::Bps;
use crate::placement::PlacementPolicy;
use crate::rotation::RotationPolicy;
use crate::scoring::RoutingPolicy;

/// Why a TOML text is not a valid policy configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("policy config is not valid TOML for deepnode: {0}")]
    Toml(String),
    #[error("policy config value out of range: {0}")]
    Invalid(String),
}

/// Reputation: Beta counts with time decay and the recent failure window (POLICY.md "Per-node
/// signals").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReputationPolicy {
    /// Half-life H of the decay of the (r, s) counts, in seconds (24 h).
    pub half_life_secs: i64,
    /// Added to r per success (1).
    pub success_weight: f64,
    /// Added to s per error or timeout (1).
    pub failure_weight: f64,
    /// Added to s per invalid output (3).
    pub invalid_output_weight: f64,
    /// The failure window holds at least the last this-many attempts (100)…
    pub failure_window_attempts: u32,
    /// …or every attempt of the last this-many seconds (1 h), whichever holds more.
    pub failure_window_secs: i64,
    /// Below this many samples in the window the failure rate is the prior (10).
    pub failure_min_samples: u32,
    /// The prior failure rate (0.1).
    pub failure_prior: Bps,
}

impl Default for ReputationPolicy {
    fn default() -> Self {
        ReputationPolicy {
            half_life_secs: 24 * 3600,
            success_weight: 1.0,
            failure_weight: 1.0,
            invalid_output_weight: 3.0,
            failure_window_attempts: 100,
            failure_window_secs: 3600,
            failure_min_samples: 10,
            failure_prior: Bps::saturating(1_000),
        }
    }
}

/// Penalties: downtime jail and slash, invalid-output slash and tombstone (POLICY.md "Penalties").
/// Phase-out thresholds are in [`RotationPolicy`], probation thresholds in [`PlacementPolicy`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PenaltyPolicy {
    /// Downtime when the success ratio over the window is below this (0.5)…
    pub downtime_success_ratio: Bps,
    /// …with at least this many attempts in the window (20).
    pub downtime_min_attempts: u32,
    /// The k-th downtime jail lasts `jail_base_secs × 2^(k−1)` (600 s)…
    pub jail_base_secs: i64,
    /// …capped at this (24 h).
    pub jail_max_secs: i64,
    /// Stake slashed for downtime (10 bps = 0.1 %).
    pub downtime_slash: Bps,
    /// Invalid outputs within the window that confirm an invalid-output fault (2).
    pub invalid_confirmations: u32,
    /// The window for confirming invalid output, in seconds (1 h).
    pub invalid_window_secs: i64,
    /// Stake slashed for an invalid-output fault (500 bps = 5 %).
    pub invalid_slash: Bps,
    /// Invalid-output faults within `tombstone_window_secs` that tombstone a node (3)…
    pub tombstone_faults: u32,
    /// …(7 days).
    pub tombstone_window_secs: i64,
}

impl Default for PenaltyPolicy {
    fn default() -> Self {
        PenaltyPolicy {
            downtime_success_ratio: Bps::saturating(5_000),
            downtime_min_attempts: 20,
            jail_base_secs: 600,
            jail_max_secs: 24 * 3600,
            downtime_slash: Bps::saturating(10),
            invalid_confirmations: 2,
            invalid_window_secs: 3600,
            invalid_slash: Bps::saturating(500),
            tombstone_faults: 3,
            tombstone_window_secs: 7 * 24 * 3600,
        }
    }
}

/// Liveness: heartbeats (POLICY.md "Liveness").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LivenessPolicy {
    /// Nodes beat every this many seconds (30).
    pub heartbeat_interval_secs: i64,
    /// A node that misses this many beats in a row is offline (2).
    pub offline_after_missed: u32,
}

impl Default for LivenessPolicy {
    fn default() -> Self {
        LivenessPolicy {
            heartbeat_interval_secs: 30,
            offline_after_missed: 2,
        }
    }
}

impl LivenessPolicy {
    /// Silence longer than this makes a node offline, in seconds (60).
    pub fn offline_after_secs(&self) -> i64 {
        self.heartbeat_interval_secs
            .saturating_mul(i64::from(self.offline_after_missed))
    }
}

/// Execution: timeouts, attempts and the retry budget (POLICY.md "Failover per request").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecPolicy {
    /// Attempt timeout when the request names none (5000 ms).
    pub default_timeout_ms: u64,
    /// Attempts per request, the first included (2).
    pub max_attempts: u8,
    /// Retries allowed as a fraction of requests (2,000 bps = 20 %)…
    pub retry_budget_ratio: Bps,
    /// …plus this many per second (10).
    pub retry_budget_per_sec: u32,
    /// Requests of one model that may wait for a free slot at once in one scheduler copy (512); one
    /// more is refused `overloaded` at once. 0: nothing waits.
    pub queue_limit: u32,
    /// The `retry_after_ms` an `overloaded` reply suggests (100).
    pub overload_retry_after_ms: u64,
}

impl Default for ExecPolicy {
    fn default() -> Self {
        ExecPolicy {
            default_timeout_ms: 5_000,
            max_attempts: 2,
            retry_budget_ratio: Bps::saturating(2_000),
            retry_budget_per_sec: 10,
            queue_limit: 512,
            overload_retry_after_ms: 100,
        }
    }
}

/// The log's signed checkpoints (issue 14, CONTRACT §4a): how often the Merkle tree's root is
/// taken, signed and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogPolicy {
    /// A checkpoint after this many more events (10,000)…
    pub checkpoint_every_events: u64,
    /// …or this long after the last one, when any event arrived since (10 s).
    pub checkpoint_every_secs: u64,
    /// The log's name in its checkpoints when no signing key names it (with a key: the key's name).
    pub origin: String,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            checkpoint_every_events: 10_000,
            checkpoint_every_secs: 10,
            origin: "deepnode.local/log".to_owned(),
        }
    }
}

/// Every policy number, with POLICY.md's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PolicyConfig {
    pub routing: RoutingPolicy,
    pub placement: PlacementPolicy,
    pub rotation: RotationPolicy,
    pub ejection: EjectionPolicy,
    pub reputation: ReputationPolicy,
    pub penalty: PenaltyPolicy,
    pub liveness: LivenessPolicy,
    pub exec: ExecPolicy,
    pub log: LogPolicy,
}

impl PolicyConfig {
    /// Parses TOML text; absent tables and keys keep their defaults, unknown keys are refused (a typo
    /// must not silently leave a default in force).
    pub fn from_toml_str(text: &str) -> Result<PolicyConfig, Error> {
        let value: toml::Value = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        let config: PolicyConfig = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        // Refuse unknown keys by round-tripping: every key of the input must survive.
        let known = toml::Value::try_from(&config).map_err(|e| Error::Toml(e.to_string()))?;
        if let Some(path) = unknown_key(&value, &known, String::new()) {
            return Err(Error::Toml(format!("unknown key `{path}`")));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the ranges that serde cannot: positive periods and weights that make sense.
    pub fn validate(&self) -> Result<(), Error> {
        let r = &self.reputation;
        if r.half_life_secs <= 0 {
            return Err(Error::Invalid(
                "reputation.half_life_secs must be > 0".into(),
            ));
        }
        for (name, w) in [
            ("success_weight", r.success_weight),
            ("failure_weight", r.failure_weight),
            ("invalid_output_weight", r.invalid_output_weight),
        ] {
            if !w.is_finite() || w < 0.0 {
                return Err(Error::Invalid(format!(
                    "reputation.{name} must be a finite number ≥ 0"
                )));
            }
        }
        if r.failure_window_attempts == 0 || r.failure_window_secs <= 0 {
            return Err(Error::Invalid(
                "reputation failure window must hold at least one attempt and one second".into(),
            ));
        }
        let p = &self.penalty;
        if p.jail_base_secs <= 0 || p.jail_max_secs < p.jail_base_secs {
            return Err(Error::Invalid(
                "penalty jail: need 0 < jail_base_secs ≤ jail_max_secs".into(),
            ));
        }
        if self.exec.max_attempts == 0 || self.exec.default_timeout_ms == 0 {
            return Err(Error::Invalid(
                "exec: max_attempts and default_timeout_ms must be > 0".into(),
            ));
        }
        if self.rotation.epoch_secs == 0 {
            return Err(Error::Invalid("rotation.epoch_secs must be > 0".into()));
        }
        if self.liveness.heartbeat_interval_secs <= 0 || self.liveness.offline_after_missed == 0 {
            return Err(Error::Invalid(
                "liveness: heartbeat interval and missed beats must be > 0".into(),
            ));
        }
        let log = &self.log;
        if log.checkpoint_every_events == 0 || log.checkpoint_every_secs == 0 {
            return Err(Error::Invalid(
                "log: checkpoint_every_events and checkpoint_every_secs must be > 0".into(),
            ));
        }
        if log.origin.is_empty() || log.origin.contains(|c: char| c.is_whitespace() || c == '+') {
            return Err(Error::Invalid(
                "log.origin must be a non-empty name without spaces or `+`".into(),
            ));
        }
        Ok(())
    }

    /// Hex SHA-256 of the config's canonical JSON (object keys sorted at every level, numbers as
    /// serde_json writes them). Equal configs hash equally whatever the TOML's key order.
    pub fn config_hash(&self) -> String {
        // Every decision records this hash: never the hash of a quiet empty value.
        let value = serde_json::to_value(self)
            .expect("the policy serialises: plain structs with string keys");
        let mut text = String::with_capacity(2048);
        write_canonical(&value, &mut text);
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

/// Writes JSON with object keys sorted, independent of serde_json's `preserve_order` feature.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The first key path present in `input` but absent from `known`.
fn unknown_key(input: &toml::Value, known: &toml::Value, path: String) -> Option<String> {
    let (toml::Value::Table(input), toml::Value::Table(known)) = (input, known) else {
        return None;
    };
    for (key, value) in input {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match known.get(key) {
            None => return Some(here),
            Some(k) => {
                if let Some(found) = unknown_key(value, k, here) {
                    return Some(found);
                }
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The default policy's hash, pinned: every recorded decision carries the `config_hash` of the
    /// policy it was made under, and an auditor recomputes it. A change here — a setting added,
    /// renamed or re-defaulted, or the canonical JSON changed — makes old decisions name a hash
    /// this binary cannot reproduce from a default config: version the change instead of editing.
    #[test]
    fn golden_vector_config_hash() {
        assert_eq!(
            PolicyConfig::default().config_hash(),
            GOLDEN_DEFAULT_CONFIG_HASH
        );
        let mut text = String::new();
        write_canonical(
            &serde_json::json!({"b": [1, 2.5, "x"], "a": {"d": null, "c": true}}),
            &mut text,
        );
        assert_eq!(text, r#"{"a":{"c":true,"d":null},"b":[1,2.5,"x"]}"#);
    }

    const GOLDEN_DEFAULT_CONFIG_HASH: &str =
        "02127645ad15ccf86bbe8354b298bef4287c9e641d988d3fb480970d25b102b2";

    #[test]
    fn defaults_are_the_policy_numbers() {
        let c = PolicyConfig::default();
        assert_eq!(c.reputation.half_life_secs, 86_400);
        assert_eq!(c.reputation.invalid_output_weight, 3.0);
        assert_eq!(c.reputation.failure_window_attempts, 100);
        assert_eq!(c.reputation.failure_prior.raw(), 1_000);
        assert_eq!(c.penalty.jail_base_secs, 600);
        assert_eq!(c.penalty.downtime_slash.raw(), 10);
        assert_eq!(c.penalty.invalid_slash.raw(), 500);
        assert_eq!(c.liveness.offline_after_secs(), 60);
        assert_eq!(c.exec.default_timeout_ms, 5_000);
        assert_eq!(c.exec.retry_budget_ratio.raw(), 2_000);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn toml_overrides_only_what_it_names() {
        // given a file that changes two numbers
        let text = "[reputation]\nhalf_life_secs = 3600\n\n[exec]\ndefault_timeout_ms = 250\n";
        // when it is loaded
        let c = PolicyConfig::from_toml_str(text).unwrap();
        // then those two change and everything else keeps its default
        let mut expected = PolicyConfig::default();
        expected.reputation.half_life_secs = 3600;
        expected.exec.default_timeout_ms = 250;
        assert_eq!(c, expected);
        assert_eq!(
            PolicyConfig::from_toml_str("").unwrap(),
            PolicyConfig::default()
        );
    }

    #[test]
    fn typos_and_bad_values_are_refused() {
        assert!(matches!(
            PolicyConfig::from_toml_str("[reputation]\nhalf_lfe_secs = 1\n"),
            Err(Error::Toml(m)) if m.contains("reputation.half_lfe_secs")
        ));
        assert!(matches!(
            PolicyConfig::from_toml_str("[reputation]\nhalf_life_secs = 0\n"),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            PolicyConfig::from_toml_str("[reputation\n"),
            Err(Error::Toml(_))
        ));
        assert!(matches!(
            PolicyConfig::from_toml_str("[rotation]\nepoch_secs = 0\n"),
            Err(Error::Invalid(m)) if m.contains("epoch_secs")
        ));
    }

    #[test]
    fn periods_and_stake_domains_come_from_the_file() {
        let c = PolicyConfig::from_toml_str(
            "[rotation]\nepoch_secs = 3600\n\n[routing]\nstake_domains = [\"finance\", \"text\"]\n",
        )
        .unwrap();
        assert_eq!(c.rotation.epoch_secs, 3_600);
        assert_eq!(c.routing.stake_domains, ["finance", "text"]);
        assert_eq!(PolicyConfig::default().rotation.epoch_secs, 60);
        assert!(PolicyConfig::default().routing.stake_domains.is_empty());
    }

    #[test]
    fn the_hash_identifies_the_numbers() {
        let a = PolicyConfig::default();
        let mut b = PolicyConfig::default();
        assert_eq!(a.config_hash(), b.config_hash());
        assert_eq!(a.config_hash().len(), 64);
        b.penalty.jail_base_secs = 601;
        assert_ne!(a.config_hash(), b.config_hash());
        // key order in the file does not matter
        let x = PolicyConfig::from_toml_str("[exec]\nmax_attempts = 2\ndefault_timeout_ms = 7\n")
            .unwrap();
        let y = PolicyConfig::from_toml_str("[exec]\ndefault_timeout_ms = 7\nmax_attempts = 2\n")
            .unwrap();
        assert_eq!(x.config_hash(), y.config_hash());
    }
}
