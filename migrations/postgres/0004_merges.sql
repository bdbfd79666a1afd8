-- Merge work: shards of kind 'merge' rewrite the committed parts of the row shards
-- [merge_first, merge_last] of their job into one output file, leased to workers like any
-- shard. Row shards are of kind 'rows'.
ALTER TABLE shards ADD COLUMN kind TEXT NOT NULL DEFAULT 'rows';
ALTER TABLE shards ADD COLUMN merge_first BIGINT;
ALTER TABLE shards ADD COLUMN merge_last BIGINT;
-- One merge per first shard: two replicas planning the same group make it once.
CREATE UNIQUE INDEX shards_merge_first ON shards (job_id, merge_first) WHERE kind = 'merge';
