-- Speculative copies: a shard of kind 'copy' runs the rest of a straggling row shard
-- (`copy_of`) on another worker, from the original's checkpoint when it was made. The first
-- of the two to complete wins; the store then drops the other's parts past that point.
ALTER TABLE shards ADD COLUMN copy_of INTEGER;
CREATE UNIQUE INDEX shards_copy_of ON shards (copy_of) WHERE kind = 'copy';
