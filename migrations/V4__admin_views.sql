-- Admin views: what an operator asks first, answered with plain SELECTs (documented in README.md,
-- "Admin views"). They read the projections of V3 and, where the projections do not keep it, the log
-- itself; they store nothing and write nothing. Scores and factors recorded by the scheduler in basis
-- points (0..10000) are shown here as fractions in [0, 1], like node_reputation.score.
--
-- Cost: v_node_ranking reads only the projections. v_model_health, v_charges_by_hour and
-- v_recent_decisions filter `events` by event_type, which V1 does not index: they scan the log
-- (v_recent_decisions stops early when asked ORDER BY global_position DESC LIMIT n). They are admin
-- tools, not something to poll every second on a log of hundreds of millions of events.

-- Every node, best score first: rank 1 is the node the placement and routing scores favour most.
CREATE VIEW v_node_ranking AS
WITH tiers AS (
    SELECT node_id,
           CASE WHEN bool_or(tier = 'top') THEN 'top' ELSE 'lower' END AS tier,
           count(*) AS deployments
      FROM deployments
     GROUP BY node_id
), in_flight AS (
    SELECT node_id, count(*) AS in_flight
      FROM executions
     WHERE status = 'in_flight' AND node_id IS NOT NULL
     GROUP BY node_id
)
SELECT row_number() OVER (ORDER BY r.score DESC, r.node_id)              AS rank,
       r.node_id,
       r.domain,
       r.score,
       t.tier,
       COALESCE(t.deployments, 0)                                       AS deployments,
       r.status,
       COALESCE(f.in_flight, 0)                                         AS in_flight,
       r.capacity,
       COALESCE(f.in_flight, 0)::double precision / NULLIF(r.capacity, 0) AS load,
       r.recent_failure_rate                                            AS failure_rate,
       r.successes + r.errors + r.timeouts + r.invalid_outputs          AS observations,
       r.stake,
       r.slashed_amount,
       r.updated_at
  FROM node_reputation r
  LEFT JOIN tiers t USING (node_id)
  LEFT JOIN in_flight f USING (node_id);

-- One row per current replica (model, node): the node's status and score, how many of the model's
-- replicas can serve, and the replica's last failure on this model (an attempt of ours that failed,
-- or a failed report ingested from outside).
CREATE VIEW v_model_health AS
WITH failures AS (
    SELECT r.payload ->> 'model_id' AS model_id,
           f.payload ->> 'node_id'  AS node_id,
           f.occurred_at,
           f.payload ->> 'outcome'  AS outcome,
           f.payload ->> 'detail'   AS detail
      FROM events f
      JOIN events r ON r.stream_id = f.stream_id AND r.stream_version = 1
     WHERE f.event_type = 'AttemptFailed'
    UNION ALL
    SELECT payload ->> 'model_id', payload ->> 'node_id', occurred_at, payload ->> 'outcome',
           'reported by ' || COALESCE(metadata ->> 'producer', 'an outside reporter')
      FROM events
     WHERE event_type = 'ExecutionReported' AND payload ->> 'outcome' <> 'success'
), last_failure AS (
    SELECT DISTINCT ON (model_id, node_id) model_id, node_id, occurred_at, outcome, detail
      FROM failures
     ORDER BY model_id, node_id, occurred_at DESC
)
SELECT d.model_id,
       d.node_id,
       d.tier,
       d.assigned_at,
       n.status,
       n.score,
       n.status IN ('active', 'probation')                       AS serving,
       count(*) OVER (PARTITION BY d.model_id)                   AS replicas,
       count(*) FILTER (WHERE n.status IN ('active', 'probation'))
           OVER (PARTITION BY d.model_id)                        AS serving_replicas,
       lf.occurred_at                                            AS last_failure_at,
       lf.outcome                                                AS last_failure_outcome,
       lf.detail                                                 AS last_failure_detail
  FROM deployments d
  LEFT JOIN node_reputation n USING (node_id)
  LEFT JOIN last_failure lf ON lf.model_id = d.model_id AND lf.node_id = d.node_id;

-- Executions that ended in each UTC hour, per model: charged (ExecutionCompleted) and not charged
-- (ExecutionFailed, every replica failed).
CREATE VIEW v_charges_by_hour AS
SELECT date_trunc('hour', occurred_at, 'UTC')                                  AS hour,
       payload ->> 'model_id'                                                  AS model_id,
       count(*) FILTER (WHERE event_type = 'ExecutionCompleted')               AS charged,
       count(*) FILTER (WHERE event_type = 'ExecutionFailed')                  AS not_charged,
       count(*)                                                                AS executions,
       count(*) FILTER (WHERE event_type = 'ExecutionFailed')::double precision
           / count(*)                                                          AS not_charged_ratio
  FROM events
 WHERE event_type IN ('ExecutionCompleted', 'ExecutionFailed')
 GROUP BY 1, 2;

-- Routing decisions, newest first: one row per (dispatched attempt, candidate the decision ranked),
-- with the per-factor values and the score the scheduler recorded in AttemptDispatched.decision.
CREATE VIEW v_recent_decisions AS
SELECT e.global_position,
       e.occurred_at,
       e.payload ->> 'request_id'                            AS request_id,
       e.payload ->> 'model_id'                              AS model_id,
       (e.payload ->> 'attempt')::int                        AS attempt,
       e.payload ->> 'role'                                  AS role,
       e.payload ->> 'node_id'                               AS dispatched_to,
       c.value ->> 'node_id'                                 AS candidate,
       (c.value ->> 'rank')::int + 1                         AS candidate_rank,
       (c.value ->> 'healthy')::boolean                      AS healthy,
       (c.value ->> 'score')::double precision / 10000       AS score,
       (c.value -> 'factors' ->> 'reputation')::double precision / 10000   AS reputation,
       (c.value -> 'factors' ->> 'load')::double precision / 10000         AS load,
       (c.value -> 'factors' ->> 'failure_rate')::double precision / 10000 AS failure_rate,
       (c.value -> 'factors' ->> 'stake')::double precision / 10000        AS stake,
       (c.value ->> 'in_flight')::int                        AS in_flight,
       e.payload -> 'decision' -> 'weights'                  AS weights,
       (e.payload -> 'decision' ->> 'stake_enabled')::boolean AS stake_enabled,
       (e.payload -> 'decision' ->> 'emergency_replacement')::boolean AS emergency_replacement,
       e.payload -> 'decision' ->> 'config_hash'             AS config_hash,
       e.metadata ->> 'correlation_id'                       AS correlation_id
  FROM events e
 CROSS JOIN LATERAL jsonb_array_elements(
           CASE WHEN jsonb_typeof(e.payload -> 'decision' -> 'candidates') = 'array'
                THEN e.payload -> 'decision' -> 'candidates' ELSE '[]'::jsonb END)
       WITH ORDINALITY AS c (value, ord)
 WHERE e.event_type = 'AttemptDispatched'
 ORDER BY e.global_position DESC, c.ord;

REVOKE ALL ON v_node_ranking, v_model_health, v_charges_by_hour, v_recent_decisions FROM PUBLIC;
GRANT SELECT ON v_node_ranking, v_model_health, v_charges_by_hour, v_recent_decisions
    TO deepnode_reader, deepnode_service;
