-- Leases are bound to their holder: each grant carries a random secret that only the worker it
-- was granted to knows (the worker's id is already on the row).
ALTER TABLE shards ADD COLUMN lease_secret TEXT;
-- The output location a job owns, as a prefix ending in '/'. No two jobs that are not
-- cancelled may own overlapping ones (one a prefix of the other): submission checks it under
-- an advisory lock.
ALTER TABLE jobs ADD COLUMN output_key TEXT;
UPDATE jobs SET output_key = rtrim(output_uri, '/') || '/';
-- The finalizer serves the job whose last claim is oldest first; a job whose commit failed
-- for a retryable reason waits out a backoff before any replica takes it again.
CREATE INDEX jobs_finalizing ON jobs (finalizer_expires_at_ms, id) WHERE state = 'finalizing';
-- Rows per model call a worker last reported for the job (`batch.size = "auto"` finds it).
ALTER TABLE jobs ADD COLUMN batch_rows BIGINT;
