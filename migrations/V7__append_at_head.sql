-- deepnode_append_at: writes a batch the appender has already placed, if the log is still where the
-- appender believes it is. The group-commit writer's fast path (crates/deepnode-store/src/append.rs).
--
-- The writer remembers the head it last wrote and a lower bound of each stream's version it has
-- seen, so for a batch whose appends it can decide from those alone it assigns positions, stream
-- versions and the hash chain itself (deepnode_domain::log::canonical_bytes, hashed in Rust) and
-- sends finished rows. This function then only:
--   * moves the head if it is the one the rows were chained to, which locks the `log_head` row as
--     deepnode_append does, so positions stay contiguous and commit order equals position order;
--     if another appender moved it, writes nothing and returns the actual head (`o_written` false)
--     for the writer to re-place and retry;
--   * inserts the rows with one INSERT.
-- Everything the writer assumed but could not know is enforced by the unique indexes: an event id
-- already in the log, or a stream that moved past the remembered version (versions are contiguous,
-- so the first version written collides), fails the statement with unique_violation and nothing is
-- written; the writer then hands the batch to deepnode_append, which looks everything up and decides
-- each append (duplicate, reused id, conflict).
--
-- Positions are p_head_position + 1 .. + n in array order, and each row's prev_hash is the hash before
-- it (p_head_hash for the first), so the rows form a chain from the head by construction.
CREATE FUNCTION deepnode_append_at(
    p_head_position bigint,
    p_head_hash     bytea,
    p_event_id      uuid[],
    p_stream        text[],
    p_version       bigint[],
    p_event_type    text[],
    p_schema        integer[],
    p_payload       text[],
    p_metadata      text[],
    p_occurred      timestamptz[],
    p_hash          bytea[],
    p_recorded      timestamptz,
    OUT o_written   boolean,
    OUT o_position  bigint,
    OUT o_hash      bytea
) LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_event_id, 1), 0);
BEGIN
    -- Moving the head locks it (until commit) and checks it in one statement: should another
    -- appender hold it, this waits for that transaction and re-checks the committed row.
    UPDATE log_head SET position = p_head_position + n, hash = p_hash[n]
     WHERE id AND position = p_head_position AND hash = p_head_hash AND n > 0;
    IF NOT FOUND THEN
        SELECT h.position, h.hash INTO o_position, o_hash FROM log_head h WHERE h.id;
        o_written := false;
        RETURN;
    END IF;
    INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                        schema_version, payload, metadata, occurred_at, recorded_at, prev_hash, hash)
    SELECT p_head_position + r.i, r.id, r.s, r.v, r.t, r.sv, r.pl::jsonb, r.md::jsonb, r.o,
           p_recorded, CASE WHEN r.i = 1 THEN p_head_hash ELSE p_hash[r.i - 1] END, r.h
      FROM unnest(p_event_id, p_stream, p_version, p_event_type, p_schema, p_payload, p_metadata,
                  p_occurred, p_hash) WITH ORDINALITY
           AS r(id, s, v, t, sv, pl, md, o, h, i);
    o_position := p_head_position + n;
    o_hash := p_hash[n];
    o_written := true;
END;
$$;

GRANT EXECUTE ON FUNCTION deepnode_append_at(bigint, bytea, uuid[], text[], bigint[], text[],
    integer[], text[], text[], timestamptz[], bytea[], timestamptz) TO deepnode_service;
