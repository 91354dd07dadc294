//! [`BookProjection`]: the one projection behind `node_reputation`, `deployments` and `executions`.
//!
//! It keeps a whole [`NodeBook`] in memory, folds each batch with `NodeBook::evolve`, and writes back
//! exactly the rows the batch touched — upserting those the book still has, deleting those it no
//! longer has (a revoked deployment) — with one `UNNEST` statement per table. All three tables share
//! ONE checkpoint, [`BOOK_PROJECTION`], because they are views of one fold: a node's counters and the
//! executions that moved them commit together, so the tables never disagree with each other.
//!
//! It does not read the log itself: the `ProjectionRunner` feeds it, writes the checkpoint in the same
//! transaction, and calls `observe`/`reset` to keep the in-memory book at the stored checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use deepnode_domain::book::{ExecutionRow, NodeBook};
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::ids::{ModelId, NodeId, RequestId};
use deepnode_store::{Projection, RecordedEvent};
use sqlx::PgConnection;

use crate::rows;

/// The checkpoint name of [`BookProjection`] in `projection_checkpoints`.
pub const BOOK_PROJECTION: &str = "deepnode_book";

/// Keeps the three CONTRACT §5 tables equal to the fold of the log (see the module docs).
pub struct BookProjection {
    config: PolicyConfig,
    book: NodeBook,
}

impl BookProjection {
    /// A projection folding with `config` (replay and audit must use the same config to agree).
    pub fn new(config: &PolicyConfig) -> BookProjection {
        BookProjection {
            config: config.clone(),
            book: NodeBook::new(config),
        }
    }

    /// The in-memory book (the fold up to the last applied or observed event).
    pub fn book(&self) -> &NodeBook {
        &self.book
    }
}

fn decode_error(
    event: &RecordedEvent,
    e: deepnode_domain::events::DecodeError,
) -> deepnode_store::Error {
    deepnode_store::Error::Decode {
        position: event.global_position,
        reason: e.to_string(),
    }
}

fn db(e: sqlx::Error) -> deepnode_store::Error {
    e.into()
}

#[async_trait]
impl Projection for BookProjection {
    fn name(&self) -> &str {
        BOOK_PROJECTION
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), deepnode_store::Error> {
        let mut nodes = BTreeSet::<NodeId>::new();
        let mut deployments = BTreeSet::<(ModelId, NodeId)>::new();
        // An ended execution's final row comes out of the fold (the book forgets it); one still in
        // flight is read from the book after the batch.
        let mut executions = BTreeMap::<RequestId, Option<ExecutionRow>>::new();
        for event in events {
            let touched = self
                .book
                .evolve(event)
                .map_err(|e| decode_error(event, e))?;
            nodes.extend(touched.node);
            deployments.extend(touched.deployment);
            if let Some(id) = touched.execution {
                executions.insert(id, touched.ended);
            }
        }

        let (mut upsert, mut delete) = (Vec::new(), Vec::new());
        for id in &nodes {
            match self.book.node_row(id) {
                Some(row) => upsert.push(row),
                None => delete.push(id.to_string()),
            }
        }
        rows::upsert_nodes(conn, &upsert).await.map_err(db)?;
        rows::delete_nodes(conn, &delete).await.map_err(db)?;

        let (mut upsert, mut delete) = (Vec::new(), Vec::new());
        for (model, node) in &deployments {
            match self.book.deployment_row(model, node) {
                Some(row) => upsert.push(row),
                None => delete.push((model.to_string(), node.to_string())),
            }
        }
        rows::upsert_deployments(conn, &upsert).await.map_err(db)?;
        rows::delete_deployments(conn, &delete).await.map_err(db)?;

        let (mut upsert, mut delete) = (Vec::new(), Vec::new());
        for (id, ended) in executions {
            match ended.or_else(|| self.book.execution_row(&id)) {
                Some(row) => upsert.push(row),
                None => delete.push(id.to_string()),
            }
        }
        rows::upsert_executions(conn, &upsert).await.map_err(db)?;
        rows::delete_executions(conn, &delete).await.map_err(db)?;
        Ok(())
    }

    fn observe(&mut self, events: &[RecordedEvent]) -> Result<(), deepnode_store::Error> {
        for event in events {
            self.book
                .evolve(event)
                .map_err(|e| decode_error(event, e))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.book = NodeBook::new(&self.config);
    }

    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), deepnode_store::Error> {
        sqlx::query("DELETE FROM node_reputation")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM deployments")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM executions")
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        Ok(())
    }
}
