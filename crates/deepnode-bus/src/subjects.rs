//! Every NATS subject and JetStream stream name deepnode uses, built from one configurable root
//! prefix (`deepnode` in production, a random one per test so parallel tests never collide).
//!
//! Services must build subjects here and never with ad-hoc `format!`. This module only builds and
//! parses names; it does not subscribe or publish.
//!
//! Note on node ids: CONTRACT §3 allows `.` in ids, which NATS treats as a token separator, so
//! `node.<id>.infer` for an id containing `.` spans several tokens. Exact subjects work as they are;
//! hearing every node's heartbeat takes one wildcard per token count
//! ([`Subjects::heartbeat_wildcard_of`]), as NATS has no "any number of tokens, then `heartbeat`".

use deepnode_domain::ids::{NodeId, MAX_NODE_ID_TOKENS};

/// Why a prefix cannot be used as a subject root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The prefix is empty, has an empty token, or a character outside `[A-Za-z0-9_-]` / `.`.
    #[error(
        "invalid subject prefix {prefix:?}: use non-empty tokens of [A-Za-z0-9_-] separated by '.'"
    )]
    InvalidPrefix {
        /// The rejected prefix.
        prefix: String,
    },
}

/// The production root prefix.
pub const DEFAULT_PREFIX: &str = "deepnode";

/// Builds subject and stream names under one root prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Subjects {
    /// Subjects under the production prefix `deepnode`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subjects under a custom prefix, e.g. `Subjects::with_prefix("t3f9a")` gives `t3f9a.cmd.exec`
    /// and stream `T3F9A_EVENTS`.
    pub fn with_prefix(prefix: &str) -> Result<Self, Error> {
        let valid = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if valid {
            Ok(Self {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(Error::InvalidPrefix {
                prefix: prefix.to_owned(),
            })
        }
    }

    /// A fresh random prefix (`t` + 12 hex digits), for tests that must not share subjects or
    /// streams with anything else running on the same server.
    pub fn random() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            prefix: format!("t{}", &id[..12]),
        }
    }

    /// The root prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn sub(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// `<prefix>.cmd.node.register`
    pub fn cmd_node_register(&self) -> String {
        self.sub("cmd.node.register")
    }

    /// `<prefix>.cmd.node.deregister`
    pub fn cmd_node_deregister(&self) -> String {
        self.sub("cmd.node.deregister")
    }

    /// `<prefix>.cmd.model.deploy`
    pub fn cmd_model_deploy(&self) -> String {
        self.sub("cmd.model.deploy")
    }

    /// `<prefix>.cmd.schedule`
    pub fn cmd_schedule(&self) -> String {
        self.sub("cmd.schedule")
    }

    /// `<prefix>.cmd.exec`
    pub fn cmd_exec(&self) -> String {
        self.sub("cmd.exec")
    }

    /// `<prefix>.cmd.rotation.run`: run one rotation round now (an on-demand addition to §3).
    pub fn cmd_rotation_run(&self) -> String {
        self.sub("cmd.rotation.run")
    }

    /// `<prefix>.scheduler.presence`: scheduler copies announce themselves to one another, to share
    /// each node's capacity (an addition to §3; core NATS, internal to the schedulers).
    pub fn scheduler_presence(&self) -> String {
        self.sub("scheduler.presence")
    }

    /// `<prefix>.node.<node_id>.infer`, answered by the node itself.
    pub fn node_infer(&self, node: &NodeId) -> String {
        self.sub(&format!("node.{node}.infer"))
    }

    /// `<prefix>.node.<node_id>.heartbeat`, published by the node itself.
    pub fn node_heartbeat(&self, node: &NodeId) -> String {
        self.sub(&format!("node.{node}.heartbeat"))
    }

    /// `<prefix>.node.*.heartbeat`: the heartbeat of every node whose id has no `.`.
    pub fn heartbeat_wildcard(&self) -> String {
        self.heartbeat_wildcard_of(1)
    }

    /// The heartbeats of every node whose id spans `tokens` subject tokens (`tokens − 1` dots):
    /// `<prefix>.node.*.*.heartbeat` for 2, and so on (see the module doc). `tokens` is clamped to
    /// `1..=MAX_NODE_ID_TOKENS`.
    pub fn heartbeat_wildcard_of(&self, tokens: usize) -> String {
        let tokens = tokens.clamp(1, MAX_NODE_ID_TOKENS);
        self.sub(&format!("node.{}heartbeat", "*.".repeat(tokens)))
    }

    /// The node id in a heartbeat subject, if `subject` is one under this prefix.
    pub fn node_of_heartbeat(&self, subject: &str) -> Option<NodeId> {
        self.node_of(subject, ".heartbeat")
    }

    /// The node id in an infer subject, if `subject` is one under this prefix.
    pub fn node_of_infer(&self, subject: &str) -> Option<NodeId> {
        self.node_of(subject, ".infer")
    }

    fn node_of(&self, subject: &str, suffix: &str) -> Option<NodeId> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".node.")?;
        NodeId::parse(rest.strip_suffix(suffix)?).ok()
    }

    /// `<prefix>.ingest.execution`: outside execution reports, JetStream with `Nats-Msg-Id`.
    pub fn ingest_execution(&self) -> String {
        self.sub("ingest.execution")
    }

    /// `<prefix>.ingest.>`: the subjects of the ingest stream.
    pub fn ingest_wildcard(&self) -> String {
        self.sub("ingest.>")
    }

    /// `<prefix>.events.<event_type>`, e.g. `deepnode.events.NodeRegistered`.
    pub fn events(&self, event_type: &str) -> String {
        self.sub(&format!("events.{event_type}"))
    }

    /// `<prefix>.events.>`: the subjects of the events stream.
    pub fn events_wildcard(&self) -> String {
        self.sub("events.>")
    }

    /// `<prefix>.checkpoints`: the log's signed checkpoints, JetStream (CONTRACT §3, §4a).
    pub fn checkpoints(&self) -> String {
        self.sub("checkpoints")
    }

    /// `<prefix>.cmd.log.checkpoint`: the latest signed checkpoint.
    pub fn cmd_log_checkpoint(&self) -> String {
        self.sub("cmd.log.checkpoint")
    }

    /// `<prefix>.cmd.log.proof`: an inclusion or consistency proof.
    pub fn cmd_log_proof(&self) -> String {
        self.sub("cmd.log.proof")
    }

    fn stream(&self, suffix: &str) -> String {
        let root: String = self
            .prefix
            .chars()
            .map(|c| match c {
                '.' | '-' => '_',
                c => c.to_ascii_uppercase(),
            })
            .collect();
        format!("{root}_{suffix}")
    }

    /// The JetStream stream holding published events: `DEEPNODE_EVENTS` by default.
    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }

    /// The JetStream stream holding the log's checkpoints: `DEEPNODE_CHECKPOINTS` by default.
    pub fn checkpoints_stream(&self) -> String {
        self.stream("CHECKPOINTS")
    }

    /// The JetStream stream holding outside execution reports: `DEEPNODE_INGEST` by default.
    pub fn ingest_stream(&self) -> String {
        self.stream("INGEST")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn default_subjects_match_the_contract() {
        let s = Subjects::new();
        let n = NodeId::parse("n1").unwrap();
        assert_eq!(s.cmd_node_register(), "deepnode.cmd.node.register");
        assert_eq!(s.cmd_node_deregister(), "deepnode.cmd.node.deregister");
        assert_eq!(s.cmd_model_deploy(), "deepnode.cmd.model.deploy");
        assert_eq!(s.cmd_schedule(), "deepnode.cmd.schedule");
        assert_eq!(s.cmd_exec(), "deepnode.cmd.exec");
        assert_eq!(s.cmd_rotation_run(), "deepnode.cmd.rotation.run");
        assert_eq!(s.node_infer(&n), "deepnode.node.n1.infer");
        assert_eq!(s.node_heartbeat(&n), "deepnode.node.n1.heartbeat");
        assert_eq!(s.heartbeat_wildcard(), "deepnode.node.*.heartbeat");
        assert_eq!(s.heartbeat_wildcard_of(1), s.heartbeat_wildcard());
        assert_eq!(s.heartbeat_wildcard_of(3), "deepnode.node.*.*.*.heartbeat");
        assert_eq!(s.heartbeat_wildcard_of(0), s.heartbeat_wildcard());
        assert_eq!(s.heartbeat_wildcard_of(1_000).matches('*').count(), 64);
        let dotted = NodeId::parse("gpu.rack-2.n01").unwrap();
        assert_eq!(
            s.node_of_heartbeat(&s.node_heartbeat(&dotted)),
            Some(dotted)
        );
        assert_eq!(s.ingest_execution(), "deepnode.ingest.execution");
        assert_eq!(s.events("NodeRegistered"), "deepnode.events.NodeRegistered");
        assert_eq!(s.events_wildcard(), "deepnode.events.>");
        assert_eq!(s.events_stream(), "DEEPNODE_EVENTS");
        assert_eq!(s.ingest_stream(), "DEEPNODE_INGEST");
    }

    #[test]
    fn custom_prefix_reaches_subjects_and_streams() {
        let s = Subjects::with_prefix("t3f9a").unwrap();
        assert_eq!(s.cmd_exec(), "t3f9a.cmd.exec");
        assert_eq!(s.events_stream(), "T3F9A_EVENTS");
        let dotted = Subjects::with_prefix("a.b-c").unwrap();
        assert_eq!(dotted.ingest_stream(), "A_B_C_INGEST");
        for bad in ["", "a..b", "a.*", "a>", "a b", "."] {
            assert!(Subjects::with_prefix(bad).is_err(), "{bad:?} accepted");
        }
        let r = Subjects::random();
        assert_ne!(r, Subjects::random());
        assert!(Subjects::with_prefix(r.prefix()).is_ok());
    }

    #[test]
    fn node_ids_are_recovered_from_subjects() {
        let s = Subjects::new();
        let n = NodeId::parse("node-7:x").unwrap();
        assert_eq!(s.node_of_heartbeat(&s.node_heartbeat(&n)), Some(n.clone()));
        assert_eq!(s.node_of_infer(&s.node_infer(&n)), Some(n.clone()));
        assert_eq!(s.node_of_heartbeat(&s.node_infer(&n)), None);
        assert_eq!(s.node_of_heartbeat("other.node.n1.heartbeat"), None);
    }
}
