-- Planning in the background: a job over many input files is answered before its shards are
-- all cut. `planning` holds until the last of them is recorded; `files_planned` counts the
-- input files recorded so far and `files_listed` how many the listing found (NULL until the
-- listing is done).
ALTER TABLE jobs ADD COLUMN planning BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE jobs ADD COLUMN files_planned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN files_listed INTEGER;
