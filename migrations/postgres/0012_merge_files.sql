-- Merge work writes its files in place, under the names the manifest will list them by, so
-- the commit copies nothing. A merge records the index of its output file and of its error
-- file (NULL when it has no such rows), and how many of each its job has up to and with it,
-- from which the next merge numbers its own. Merges made before this have none of these, nor
-- do the later merges of their job: their files are copied at commit, as before.
ALTER TABLE shards ADD COLUMN output_file BIGINT;
ALTER TABLE shards ADD COLUMN error_file BIGINT;
ALTER TABLE shards ADD COLUMN output_files BIGINT;
ALTER TABLE shards ADD COLUMN error_files BIGINT;
-- The output schema (JSON of the manifest's fields), from the footer of the first file merge
-- work wrote in place, checked when it was checkpointed: the commit then reads no footer of
-- a file the size of the output.
ALTER TABLE jobs ADD COLUMN output_schema TEXT;
