-- The reputation service assesses outcomes from the log, keeping its place in the checkpoint
-- `reputation-outcomes` (it used to take them from a JetStream consumer of that name, which kept its
-- own place). A database that already holds a log starts the assessment at the head it has now:
-- what the consumer assessed is not assessed again, against today's state of the nodes. A new
-- database starts at 0, the beginning.
INSERT INTO projection_checkpoints (projection, global_position)
SELECT 'reputation-outcomes', COALESCE(max(global_position), 0) FROM events
ON CONFLICT (projection) DO NOTHING;
