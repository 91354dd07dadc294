-- Where each projection has got to in the log. A projection's rows and its checkpoint are written in
-- the same transaction, so the rows always equal the fold of `events` up to `global_position`.
CREATE TABLE projection_checkpoints (
    projection      text   PRIMARY KEY,
    global_position bigint NOT NULL CHECK (global_position >= 0)
);

GRANT SELECT, INSERT, UPDATE ON projection_checkpoints TO deepnode_service;
GRANT SELECT ON projection_checkpoints TO deepnode_reader;
