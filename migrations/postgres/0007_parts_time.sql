-- When each part was recorded (database clock), so a job's throughput over time can be shown.
-- Parts recorded before this migration read 0 and are left out of it.
ALTER TABLE parts ADD COLUMN created_at_ms BIGINT NOT NULL DEFAULT 0;
CREATE INDEX parts_created ON parts (created_at_ms);
