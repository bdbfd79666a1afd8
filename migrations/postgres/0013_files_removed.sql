-- When a later job takes the output of a cancelled job, the cancelled job's files are removed:
-- its committed parts no longer exist, so it can no longer be retried from its checkpoints.
ALTER TABLE jobs ADD COLUMN files_removed_at_ms BIGINT;
