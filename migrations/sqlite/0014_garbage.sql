-- A succeeded job's parts (a second copy of its rows) and the uploads its workers left open
-- are collected after its commit; until that is done, `garbage_pending` holds, so that a
-- coordinator that died first, or a store that refused, has it collected by a later pass.
ALTER TABLE jobs ADD COLUMN garbage_pending BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX jobs_garbage_pending ON jobs (id) WHERE garbage_pending;
