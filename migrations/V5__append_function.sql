-- deepnode_append: decides and writes a batch of appends in one statement, so a group commit costs
-- one round trip (plus the flush) instead of one per step.
--
-- In the caller's transaction (a lone statement is its own): locks the `log_head` row, which
-- serialises all appenders until that transaction ends, so positions stay contiguous and commit
-- order equals position order; then, append by append, in order:
--   * idempotency: when any of an append's event ids is already in the log (or written earlier in
--     this batch), the append is a `duplicate` if all of them are, with the same stream, type,
--     schema version and payload; otherwise `reused`, naming the first id that differs;
--   * optimistic concurrency: `p_expected` is NULL (any version), 0 (the stream must not exist) or
--     the stream's exact current version, else `conflict` with the actual version;
--   * positions, stream versions and the hash chain:
--     hash = sha256(prev_hash ‖ p_tag ‖ position ‖ identity ‖ stream_version ‖ body),
--     the canonical bytes of deepnode_domain::log::canonical_bytes, whose position- and
--     version-free parts the appender encodes (`p_identity`, `p_body`).
-- Then inserts every accepted event with one INSERT and moves the head. Returns one row per append,
-- in order (`o_append` is its 1-based index).
--
-- Events are passed as parallel arrays, the appends' events concatenated in order; `p_count` says
-- how many belong to each append. `p_repeated` names the event ids given more than once in the batch
-- (concurrent retries of one append), the only ones whose writes later appends must see as priors.
CREATE FUNCTION deepnode_append(
    p_stream     text[],
    p_expected   bigint[],
    p_count      integer[],
    p_event_id   uuid[],
    p_event_type text[],
    p_schema     integer[],
    p_payload    text[],
    p_metadata   text[],
    p_occurred   timestamptz[],
    p_identity   bytea[],
    p_body       bytea[],
    p_repeated   uuid[],
    p_recorded   timestamptz,
    p_tag        bytea,
    OUT o_append         integer,
    OUT o_outcome        text,
    OUT o_stream_version bigint,
    OUT o_positions      bigint[],
    OUT o_actual         bigint,
    OUT o_event_id       uuid
) RETURNS SETOF record LANGUAGE plpgsql
-- Its statements are planned once per session (re-planning them on every call cost more than running
-- them: 0.25 ms of ~0.5 ms), and as index lookups whatever the statistics said when that happened: a
-- plan made while `events` was tiny would otherwise seq-scan it for as long as the session lives.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    head_position bigint;
    head_hash     bytea;
    pos           bigint;
    prev          bytea;
    versions      jsonb;
    priors        jsonb;
    n_events      integer := coalesce(array_length(p_event_id, 1), 0);
    -- Per event, NULL where the event is not written.
    w_position    bigint[] := array_fill(NULL::bigint, ARRAY[n_events]);
    w_stream      text[]   := array_fill(NULL::text, ARRAY[n_events]);
    w_version     bigint[] := array_fill(NULL::bigint, ARRAY[n_events]);
    w_prev        bytea[]  := array_fill(NULL::bytea, ARRAY[n_events]);
    w_hash        bytea[]  := array_fill(NULL::bytea, ARRAY[n_events]);
    first_event   integer;
    last_event    integer := 0;
    n_found       integer;
    first_bad     uuid;
    prior         jsonb;
    version       bigint;
    actual        bigint;
BEGIN
    SELECT h.position, h.hash INTO head_position, head_hash FROM log_head h WHERE h.id FOR UPDATE;
    pos := head_position;
    prev := head_hash;

    SELECT coalesce(jsonb_object_agg(s.id, (SELECT coalesce(max(e.stream_version), 0)
                                              FROM events e WHERE e.stream_id = s.id)), '{}')
      INTO versions
      FROM (SELECT DISTINCT unnest(p_stream) AS id) s;

    SELECT coalesce(jsonb_object_agg(e.event_id::text,
                        jsonb_build_array(e.global_position, e.stream_id, e.stream_version,
                                          e.event_type, e.schema_version, e.payload)), '{}')
      INTO priors
      FROM events e WHERE e.event_id = ANY (p_event_id);

    FOR a IN 1 .. coalesce(array_length(p_stream, 1), 0) LOOP
        first_event := last_event + 1;
        last_event := last_event + p_count[a];
        o_append := a;
        o_positions := '{}';
        o_actual := NULL;
        o_event_id := NULL;

        n_found := 0;
        first_bad := NULL;
        version := 0;
        FOR i IN first_event .. last_event LOOP
            prior := priors -> p_event_id[i]::text;
            IF prior IS NOT NULL THEN
                n_found := n_found + 1;
            END IF;
            IF prior IS NOT NULL
               AND prior ->> 1 = p_stream[a]
               AND prior ->> 3 = p_event_type[i]
               AND (prior ->> 4)::integer = p_schema[i]
               AND prior -> 5 = p_payload[i]::jsonb THEN
                o_positions := o_positions || (prior ->> 0)::bigint;
                version := greatest(version, (prior ->> 2)::bigint);
            ELSIF first_bad IS NULL THEN
                first_bad := p_event_id[i];
            END IF;
        END LOOP;
        IF n_found > 0 THEN
            IF first_bad IS NULL THEN
                o_outcome := 'duplicate';
                o_stream_version := version;
            ELSE
                o_outcome := 'reused';
                o_event_id := first_bad;
                o_positions := '{}';
                o_stream_version := NULL;
            END IF;
            RETURN NEXT;
            CONTINUE;
        END IF;

        actual := (versions ->> p_stream[a])::bigint;
        IF p_expected[a] IS NOT NULL AND p_expected[a] <> actual THEN
            o_outcome := 'conflict';
            o_actual := actual;
            o_stream_version := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;

        version := actual;
        FOR i IN first_event .. last_event LOOP
            pos := pos + 1;
            version := version + 1;
            w_position[i] := pos;
            w_stream[i] := p_stream[a];
            w_version[i] := version;
            w_prev[i] := prev;
            prev := sha256(prev || p_tag || int8send(pos) || p_identity[i] || int8send(version)
                           || p_body[i]);
            w_hash[i] := prev;
            o_positions := o_positions || pos;
            IF p_event_id[i] = ANY (p_repeated) THEN
                priors := priors || jsonb_build_object(p_event_id[i]::text,
                    jsonb_build_array(pos, p_stream[a], version, p_event_type[i], p_schema[i],
                                      p_payload[i]::jsonb));
            END IF;
        END LOOP;
        versions := versions || jsonb_build_object(p_stream[a], version);
        o_outcome := 'appended';
        o_stream_version := version;
        RETURN NEXT;
    END LOOP;

    IF pos > head_position THEN
        INSERT INTO events (global_position, event_id, stream_id, stream_version, event_type,
                            schema_version, payload, metadata, occurred_at, recorded_at,
                            prev_hash, hash)
        SELECT r.p, r.id, r.s, r.v, r.t, r.sv, r.pl::jsonb, r.md::jsonb, r.o, p_recorded, r.ph, r.h
          FROM unnest(w_position, p_event_id, w_stream, w_version, p_event_type, p_schema,
                      p_payload, p_metadata, p_occurred, w_prev, w_hash)
               AS r(p, id, s, v, t, sv, pl, md, o, ph, h)
         WHERE r.p IS NOT NULL;
        UPDATE log_head SET position = pos, hash = prev WHERE id;
    END IF;
END;
$$;

GRANT EXECUTE ON FUNCTION deepnode_append(text[], bigint[], integer[], uuid[], text[], integer[],
    text[], text[], timestamptz[], bytea[], bytea[], uuid[], timestamptz, bytea) TO deepnode_service;
