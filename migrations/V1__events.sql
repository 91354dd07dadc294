-- The event log: the single source of truth. Append-only, gap-free, hash-chained.
--
-- Global positions are assigned while holding the row lock on `log_head`, which every appender takes
-- before it writes and keeps until it commits. Appending transactions therefore commit in position
-- order and positions are contiguous (a rolled-back append also rolls back its claim on the head), so
-- a reader that has seen position N can never later see a new event at a position <= N.

CREATE TABLE events (
    global_position bigint      PRIMARY KEY CHECK (global_position > 0),
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL CHECK (stream_id ~ '^[A-Za-z0-9._:-]{1,200}$'),
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_type      text        NOT NULL CHECK (event_type ~ '^[A-Z][A-Za-z0-9]{0,127}$'),
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    payload         jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    metadata        jsonb       NOT NULL CHECK (jsonb_typeof(metadata) = 'object'),
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    prev_hash       bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            bytea       NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_occurred_at_idx ON events (occurred_at);

-- The head of the log: last position and last hash. One row; its lock serialises appenders.
CREATE TABLE log_head (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    position bigint  NOT NULL CHECK (position >= 0),
    hash     bytea   NOT NULL CHECK (octet_length(hash) = 32)
);
INSERT INTO log_head (id, position, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- Immutability, enforced by the database for everyone, superusers included (a superuser must
-- deliberately disable the triggers to tamper, and the hash chain then names the altered position).
CREATE FUNCTION deepnode_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: % is refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'the event log is immutable; append a compensating event instead';
END;
$$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION deepnode_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION deepnode_refuse_change();
CREATE TRIGGER log_head_no_delete BEFORE DELETE ON log_head
    FOR EACH ROW EXECUTE FUNCTION deepnode_refuse_change();
CREATE TRIGGER log_head_no_truncate BEFORE TRUNCATE ON log_head
    FOR EACH STATEMENT EXECUTE FUNCTION deepnode_refuse_change();

-- Wake subscribers after commit (NOTIFY is delivered only when the appending transaction commits).
CREATE FUNCTION deepnode_notify_append() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('deepnode_events', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION deepnode_notify_append();

-- Roles are cluster-wide, so several databases (tests) may race to create them: tolerate that.
DO $$
BEGIN
    CREATE ROLE deepnode_service NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;
DO $$
BEGIN
    CREATE ROLE deepnode_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

REVOKE ALL ON events, log_head FROM PUBLIC;
GRANT SELECT, INSERT ON events TO deepnode_service;
GRANT SELECT, UPDATE ON log_head TO deepnode_service;
GRANT SELECT ON events, log_head TO deepnode_reader;
