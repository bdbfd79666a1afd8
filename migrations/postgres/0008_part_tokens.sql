-- A text job's tokens per part: real ones, padded ones and texts cut at max_length, summed
-- into the job's padding efficiency.
ALTER TABLE parts ADD COLUMN real_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE parts ADD COLUMN padded_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE parts ADD COLUMN truncated_rows BIGINT NOT NULL DEFAULT 0;
