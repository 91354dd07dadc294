-- The read models of CONTRACT §5, kept by the `deepnode_book` projection (crates/deepnode-projections):
-- one NodeBook fold writes all three tables and ONE checkpoint row (`deepnode_book` in
-- projection_checkpoints), in the same transaction, so the three tables always agree with each other
-- and with the fold of `events` up to that checkpoint. Admins and auditors read them; only the
-- projector writes them.

CREATE TABLE node_reputation (
    node_id             text             PRIMARY KEY,
    domain              text             NOT NULL,
    stake               double precision NOT NULL,
    capacity            integer          NOT NULL,
    score               double precision NOT NULL CHECK (score >= 0 AND score <= 1),
    successes           bigint           NOT NULL,
    errors              bigint           NOT NULL,
    timeouts            bigint           NOT NULL,
    invalid_outputs     bigint           NOT NULL,
    recent_failure_rate double precision NOT NULL,
    status              text             NOT NULL CHECK (status IN
        ('active', 'probation', 'jailed', 'offline', 'phased_out', 'tombstoned', 'deregistered')),
    slashed_amount      double precision NOT NULL,
    registered_at       timestamptz      NOT NULL,
    updated_at          timestamptz      NOT NULL
);
-- "Which nodes of this domain are eligible, best first" and "who is jailed/offline".
CREATE INDEX node_reputation_domain_score_idx ON node_reputation (domain, score DESC);
CREATE INDEX node_reputation_status_idx ON node_reputation (status);

-- Current assignments only: a revoked replica's row is deleted.
CREATE TABLE deployments (
    model_id    text        NOT NULL,
    node_id     text        NOT NULL,
    tier        text        NOT NULL CHECK (tier IN ('top', 'lower')),
    assigned_at timestamptz NOT NULL,
    PRIMARY KEY (model_id, node_id)
);
-- "What does this node serve".
CREATE INDEX deployments_node_idx ON deployments (node_id);

CREATE TABLE executions (
    request_id   text        PRIMARY KEY,
    model_id     text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('succeeded', 'failed', 'in_flight')),
    node_id      text,
    attempts     integer     NOT NULL CHECK (attempts >= 0),
    charged      boolean     NOT NULL,
    requested_at timestamptz NOT NULL,
    completed_at timestamptz
);
-- Per-model and per-node history over time, and the (small) set of executions still in flight.
CREATE INDEX executions_model_requested_idx ON executions (model_id, requested_at);
CREATE INDEX executions_node_requested_idx ON executions (node_id, requested_at);
CREATE INDEX executions_in_flight_idx ON executions (requested_at) WHERE status = 'in_flight';

REVOKE ALL ON node_reputation, deployments, executions FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON node_reputation, deployments, executions TO deepnode_service;
GRANT SELECT ON node_reputation, deployments, executions TO deepnode_reader;
-- The projector's rebuild resets its checkpoint; V2 granted no DELETE there and none is needed.
