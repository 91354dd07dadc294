//! The decisions of a demo run, read from the log: replicas moved by rotation (a better challenger,
//! a growth-slot redraw, an incumbent that broke a hard rule), nodes ejected, jailed, slashed,
//! phased out and promoted — each with its reason as the event states it. The live view shows the
//! latest; the summary counts them and says, per bad node, how it was caught.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deepnode_domain::rotation::{self, MoveKind};
use serde_json::Value;
use sqlx::PgPool;

/// The event types that carry a decision.
pub const DECISION_EVENTS: [&str; 5] = [
    "DeploymentAssigned",
    "DeploymentRevoked",
    "NodeEjected",
    "NodeStatusChanged",
    "NodeSlashed",
];

/// What was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Rotation put a better challenger in a replica's place.
    Improved,
    /// Rotation redrew a model's growth slot.
    Redrawn,
    /// Rotation replaced an incumbent that broke a hard rule (jailed, ejected, phased out…).
    Replaced,
    Ejected,
    Jailed,
    Slashed,
    /// Phased out or tombstoned.
    PhasedOut,
    /// Promoted from probation to active.
    Promoted,
}

impl Kind {
    /// The words the summary and the view use.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Improved => "moved (a better challenger)",
            Kind::Redrawn => "growth slot redrawn",
            Kind::Replaced => "replaced (hard rule broken)",
            Kind::Ejected => "ejected",
            Kind::Jailed => "jailed",
            Kind::Slashed => "slashed",
            Kind::PhasedOut => "phased out",
            Kind::Promoted => "promoted to active",
        }
    }

    /// Whether this is a rotation move.
    pub fn is_move(self) -> bool {
        matches!(self, Kind::Improved | Kind::Redrawn | Kind::Replaced)
    }

    /// Whether this catches a node at misbehaving.
    pub fn catches(self) -> bool {
        matches!(
            self,
            Kind::Ejected | Kind::Jailed | Kind::Slashed | Kind::PhasedOut
        )
    }
}

/// One decision, as the log states it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub position: i64,
    pub at: DateTime<Utc>,
    pub kind: Kind,
    /// The node decided about (for a move: the node moved in).
    pub node: String,
    /// For a move: the model and the node moved out, when the log says.
    pub model: Option<String>,
    pub replaced: Option<String>,
    /// The reason the event gives.
    pub why: String,
}

impl Decision {
    /// One line for the view.
    pub fn line(&self) -> String {
        let at = self.at.format("%H:%M:%S");
        match (&self.model, self.kind.is_move()) {
            (Some(model), true) => format!(
                "{at}  {model}: {} {}  — {}",
                self.node,
                self.replaced
                    .as_ref()
                    .map_or_else(|| "added".to_owned(), |r| format!("replaces {r}")),
                self.why.trim_start_matches(rotation::MOVE_REASON_PREFIX)
            ),
            _ => format!("{at}  {} {}  — {}", self.node, self.kind.label(), self.why),
        }
    }
}

/// The decision `event_type` with `payload` records, if it records one. A `DeploymentRevoked`
/// records none on its own: it names the node a move took out (see [`replaced_by`]).
pub fn classify(event_type: &str, payload: &Value) -> Option<(Kind, String)> {
    let text = |field: &str| payload.get(field).and_then(Value::as_str).unwrap_or("");
    let why = text("reason").to_owned();
    let kind = match event_type {
        "DeploymentAssigned" => match MoveKind::of_assignment(&why)? {
            MoveKind::GrowthRedraw => Kind::Redrawn,
            MoveKind::HardRule => Kind::Replaced,
            MoveKind::Improvement => Kind::Improved,
        },
        "NodeEjected" => Kind::Ejected,
        "NodeSlashed" => Kind::Slashed,
        "NodeStatusChanged" => match text("to") {
            "jailed" => Kind::Jailed,
            "phased_out" | "tombstoned" => Kind::PhasedOut,
            "active" if text("from") == "probation" => Kind::Promoted,
            _ => return None,
        },
        _ => return None,
    };
    Some((kind, why))
}

/// For a `DeploymentRevoked` written by a move: the node it made room for.
fn replaced_by(payload: &Value) -> Option<&str> {
    rotation::replaced_by(payload.get("reason").and_then(Value::as_str)?)
}

type Row = (i64, DateTime<Utc>, String, Value);

/// The decisions after position `from` (oldest first); at most the `limit` latest when given.
pub async fn read(pool: &PgPool, from: i64, limit: Option<i64>) -> Result<Vec<Decision>, String> {
    // Newest first with a limit, so the view reads a few rows whatever the run's length; a move's
    // revocation is the event right after its assignment, so one more row is read.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT global_position, occurred_at, event_type, payload FROM events
          WHERE global_position > $1 AND event_type = ANY($2)
          ORDER BY global_position DESC LIMIT $3",
    )
    .bind(from)
    .bind(&DECISION_EVENTS[..])
    .bind(limit.map_or(i64::MAX, |l| l.saturating_mul(2).saturating_add(1)))
    .fetch_all(pool)
    .await
    .map_err(|e| format!("reading decisions: {e}"))?;
    let mut decisions = fold(rows.into_iter().rev());
    if let Some(limit) = limit {
        let keep = usize::try_from(limit).unwrap_or(0);
        decisions.drain(..decisions.len().saturating_sub(keep));
    }
    Ok(decisions)
}

/// Turns decision events (in log order) into decisions, pairing each move with the revocation
/// that names it.
fn fold(rows: impl Iterator<Item = Row>) -> Vec<Decision> {
    let mut out: Vec<Decision> = Vec::new();
    for (position, at, event_type, payload) in rows {
        let node = payload
            .get("node_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let model = payload
            .get("model_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if event_type == "DeploymentRevoked" {
            if let (Some(incoming), Some(last)) = (replaced_by(&payload), out.last_mut()) {
                if last.kind.is_move() && last.node == incoming && last.model == model {
                    last.replaced = Some(node);
                }
            }
            continue;
        }
        if let Some((kind, why)) = classify(&event_type, &payload) {
            out.push(Decision {
                position,
                at,
                kind,
                node,
                model: model.filter(|_| kind.is_move()),
                replaced: None,
                why,
            });
        }
    }
    out
}

/// How many decisions of each kind, and which kinds caught each node.
#[derive(Debug, Default)]
pub struct Tally {
    pub by_kind: BTreeMap<Kind, u64>,
    /// Per node: the kinds decided about it, with counts.
    pub by_node: BTreeMap<String, BTreeMap<Kind, u64>>,
    /// Nodes that got a growth slot (a backup) this run, at placement or by rotation.
    pub backup_slots: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts `decisions`, and the growth-tier assignments after `from`.
    pub async fn read(pool: &PgPool, from: i64) -> Result<Tally, String> {
        let mut tally = Tally::default();
        for d in read(pool, from, None).await? {
            *tally.by_kind.entry(d.kind).or_default() += 1;
            *tally
                .by_node
                .entry(d.node.clone())
                .or_default()
                .entry(d.kind)
                .or_default() += 1;
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT payload->>'node_id', count(*) FROM events
              WHERE global_position > $1 AND event_type = 'DeploymentAssigned'
                AND payload->>'tier' = 'lower'
              GROUP BY 1",
        )
        .bind(from)
        .fetch_all(pool)
        .await
        .map_err(|e| format!("counting growth slots: {e}"))?;
        tally.backup_slots = rows
            .into_iter()
            .map(|(n, c)| (n, u64::try_from(c).unwrap_or(0)))
            .collect();
        Ok(tally)
    }

    /// How many of `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.by_kind.get(&kind).copied().unwrap_or(0)
    }

    /// What caught `node`: e.g. `jailed ×1, slashed ×1, ejected ×3` (empty if nothing did).
    pub fn caught(&self, node: &str) -> String {
        self.by_node
            .get(node)
            .map(|kinds| {
                kinds
                    .iter()
                    .filter(|(k, _)| k.catches())
                    .map(|(k, n)| format!("{} ×{n}", k.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    /// Whether `node` was promoted from probation to active.
    pub fn promoted(&self, node: &str) -> bool {
        self.by_node
            .get(node)
            .is_some_and(|k| k.contains_key(&Kind::Promoted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_read_as_the_decisions_they_record() {
        let kind = |t: &str, p: Value| classify(t, &p).map(|(k, _)| k);
        let assigned = |reason: &str| json!({"node_id": "a", "model_id": "m", "tier": "lower", "reason": reason});
        assert_eq!(
            kind(
                "DeploymentAssigned",
                assigned("rotation: growth-slot redraw")
            ),
            Some(Kind::Redrawn)
        );
        assert_eq!(
            kind(
                "DeploymentAssigned",
                assigned("rotation: challenger score 9943 bps beats incumbent 6725 bps by at least the hysteresis")
            ),
            Some(Kind::Improved)
        );
        assert_eq!(
            kind(
                "DeploymentAssigned",
                assigned("rotation: incumbent breaks a hard rule (status_jailed)")
            ),
            Some(Kind::Replaced)
        );
        assert_eq!(
            kind(
                "DeploymentAssigned",
                assigned("placement: seeded growth-tier draw")
            ),
            None
        );
        let status =
            |from: &str, to: &str| json!({"node_id": "a", "from": from, "to": to, "reason": "r"});
        assert_eq!(
            kind("NodeStatusChanged", status("probation", "jailed")),
            Some(Kind::Jailed)
        );
        assert_eq!(
            kind("NodeStatusChanged", status("active", "tombstoned")),
            Some(Kind::PhasedOut)
        );
        assert_eq!(
            kind("NodeStatusChanged", status("probation", "active")),
            Some(Kind::Promoted)
        );
        assert_eq!(
            kind("NodeStatusChanged", status("jailed", "probation")),
            None
        );
        assert_eq!(
            kind("NodeSlashed", json!({"node_id": "a", "reason": "downtime"})),
            Some(Kind::Slashed)
        );
        assert_eq!(
            kind("NodeEjected", json!({"node_id": "a", "reason": "r"})),
            Some(Kind::Ejected)
        );
    }

    #[test]
    fn a_move_names_the_node_it_took_out() {
        let at = DateTime::UNIX_EPOCH;
        let rows = vec![
            (
                7,
                at,
                "DeploymentAssigned".to_owned(),
                json!({"node_id": "in", "model_id": "m", "tier": "lower", "reason": "rotation: growth-slot redraw"}),
            ),
            (
                8,
                at,
                "DeploymentRevoked".to_owned(),
                json!({"node_id": "out", "model_id": "m", "reason": "rotation: replaced by in"}),
            ),
            (
                9,
                at,
                "NodeSlashed".to_owned(),
                json!({"node_id": "bad", "reason": "downtime"}),
            ),
        ];
        let decisions = fold(rows.into_iter());
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions[0].replaced.as_deref(), Some("out"));
        assert_eq!(
            decisions[0].line(),
            "00:00:00  m: in replaces out  — growth-slot redraw"
        );
        assert_eq!(decisions[1].line(), "00:00:00  bad slashed  — downtime");
    }
}
