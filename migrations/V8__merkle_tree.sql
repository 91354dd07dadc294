-- The log's Merkle tree and its checkpoints (issue 14, CONTRACT §4a).
--
-- merkle_subtrees: the hash of every complete subtree of the tree whose leaf i is the event at
-- global_position i + 1 (RFC 9162: leaf = SHA-256(0x00 || canonical bytes), node = SHA-256(0x01 ||
-- left || right)); the subtree (level, idx) holds the 2^level leaves from idx * 2^level. Derived
-- from the log by the `merkle` projection (deepnode_domain::merkle); every inclusion or consistency
-- proof is put together from O(log n) of these rows. Derived data: a wrong row only makes a proof
-- fail against a signed checkpoint.
CREATE TABLE merkle_subtrees (
    level smallint NOT NULL CHECK (level BETWEEN 0 AND 62),
    idx bigint NOT NULL CHECK (idx >= 0),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

-- log_checkpoints: each checkpoint of the tree as taken — the C2SP tlog-checkpoint text in a signed
-- note (signed with the key DEEPNODE_LOG_KEY names; `signed` false when none was configured). Also
-- published to the JetStream stream DEEPNODE_CHECKPOINTS, outside the database; append-only here.
CREATE TABLE log_checkpoints (
    tree_size bigint PRIMARY KEY CHECK (tree_size >= 0),
    root bytea NOT NULL CHECK (length(root) = 32),
    note text NOT NULL,
    signed boolean NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER log_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON log_checkpoints
    FOR EACH ROW EXECUTE FUNCTION deepnode_refuse_change();
CREATE TRIGGER log_checkpoints_no_truncate BEFORE TRUNCATE ON log_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION deepnode_refuse_change();
