-- The fleet: what machine each worker runs on (reported with its claims), a drain asked of it
-- by the scaler, and each lease's time, kept when the lease ends, for each job's cost report.
ALTER TABLE workers ADD COLUMN instance_id TEXT;
ALTER TABLE workers ADD COLUMN instance_type TEXT;
ALTER TABLE workers ADD COLUMN capacity_type TEXT;
ALTER TABLE workers ADD COLUMN slots BIGINT NOT NULL DEFAULT 1;
ALTER TABLE workers ADD COLUMN gpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN drain_requested_at_ms BIGINT;
-- When a coordinator first told the worker (in its answer to a claim or heartbeat).
ALTER TABLE workers ADD COLUMN drain_told_at_ms BIGINT;

-- When the current grant began and when it last checkpointed (database clock).
ALTER TABLE shards ADD COLUMN leased_at_ms BIGINT;
ALTER TABLE shards ADD COLUMN checkpoint_at_ms BIGINT;

-- One row per ended lease: how long it was held, and how much of that produced nothing that
-- was kept (the time since its last checkpoint, unless it completed), with the worker's machine
-- as it was then.
CREATE TABLE lease_usage (
    id            BIGSERIAL PRIMARY KEY,
    job_id        BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    worker_id     TEXT    NOT NULL,
    instance_type TEXT,
    capacity_type TEXT,
    slots         BIGINT  NOT NULL,
    gpus          BIGINT  NOT NULL,
    held_ms       BIGINT  NOT NULL,
    lost_ms       BIGINT  NOT NULL
);
CREATE INDEX lease_usage_job ON lease_usage (job_id);

-- Every path that grants, checkpoints or ends a lease (claim, checkpoint, complete, release,
-- fail, the reaper, a re-grant of an expired lease) goes through these triggers, so the times
-- are kept in one place whatever statement did it. Heartbeats change none of the columns in
-- the WHEN clauses and cost nothing here.
CREATE FUNCTION ns_shard_lease_times() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'leased' AND (OLD.state <> 'leased' OR NEW.token <> OLD.token) THEN
        NEW.leased_at_ms := ns_now_ms();
        NEW.checkpoint_at_ms := NULL;
    ELSIF NEW.checkpoint_rows <> OLD.checkpoint_rows THEN
        NEW.checkpoint_at_ms := ns_now_ms();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER shards_lease_times BEFORE UPDATE ON shards FOR EACH ROW
    WHEN (NEW.state <> OLD.state OR NEW.token <> OLD.token
          OR NEW.checkpoint_rows <> OLD.checkpoint_rows)
    EXECUTE FUNCTION ns_shard_lease_times();

CREATE FUNCTION ns_lease_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lease_usage
        (job_id, worker_id, instance_type, capacity_type, slots, gpus, held_ms, lost_ms)
    SELECT OLD.job_id, COALESCE(OLD.worker_id, ''), w.instance_type, w.capacity_type,
           COALESCE(w.slots, 1), COALESCE(w.gpus, 0),
           GREATEST(ns_now_ms() - OLD.leased_at_ms, 0),
           CASE WHEN NEW.state = 'done' THEN 0
                ELSE GREATEST(ns_now_ms() - COALESCE(OLD.checkpoint_at_ms, OLD.leased_at_ms), 0)
           END
    FROM (SELECT 1) AS one LEFT JOIN workers w ON w.id = OLD.worker_id;
    RETURN NULL;
END $$;
CREATE TRIGGER shards_lease_usage AFTER UPDATE ON shards FOR EACH ROW
    WHEN (OLD.state = 'leased' AND OLD.leased_at_ms IS NOT NULL
          AND (NEW.state <> 'leased' OR NEW.token <> OLD.token))
    EXECUTE FUNCTION ns_lease_usage();
