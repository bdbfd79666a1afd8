-- One replica plans a job at a time. Without a claim every replica listed the input and read
-- its footers, and all but one had their pieces refused and started over from the listing.
-- The claim is renewed before each piece; one whose replica stopped expires.
ALTER TABLE jobs ADD COLUMN planner_owner TEXT;
ALTER TABLE jobs ADD COLUMN planner_expires_at_ms BIGINT;
