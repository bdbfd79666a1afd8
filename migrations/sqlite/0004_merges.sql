-- Merge work: shards of kind 'merge' rewrite the committed parts of the row shards
-- [merge_first, merge_last] of their job into one output file, leased to workers like any
-- shard. Row shards are of kind 'rows'.
ALTER TABLE shards ADD COLUMN kind TEXT NOT NULL DEFAULT 'rows';
ALTER TABLE shards ADD COLUMN merge_first INTEGER;
ALTER TABLE shards ADD COLUMN merge_last INTEGER;
-- One merge per first shard: planning the same group twice makes it once.
CREATE UNIQUE INDEX shards_merge_first ON shards (job_id, merge_first) WHERE kind = 'merge';
