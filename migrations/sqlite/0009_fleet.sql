-- The fleet: what machine each worker runs on (reported with its claims), a drain asked of it
-- by the scaler, and each lease's time, kept when the lease ends, for each job's cost report.
ALTER TABLE workers ADD COLUMN instance_id TEXT;
ALTER TABLE workers ADD COLUMN instance_type TEXT;
ALTER TABLE workers ADD COLUMN capacity_type TEXT;
ALTER TABLE workers ADD COLUMN slots INTEGER NOT NULL DEFAULT 1;
ALTER TABLE workers ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN drain_requested_at_ms INTEGER;
-- When a coordinator first told the worker (in its answer to a claim or heartbeat).
ALTER TABLE workers ADD COLUMN drain_told_at_ms INTEGER;

-- When the current grant began and when it last checkpointed (database clock).
ALTER TABLE shards ADD COLUMN leased_at_ms INTEGER;
ALTER TABLE shards ADD COLUMN checkpoint_at_ms INTEGER;

-- One row per ended lease: how long it was held, and how much of that produced nothing that
-- was kept (the time since its last checkpoint, unless it completed), with the worker's machine
-- as it was then.
CREATE TABLE lease_usage (
    id            INTEGER PRIMARY KEY,
    job_id        INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    worker_id     TEXT    NOT NULL,
    instance_type TEXT,
    capacity_type TEXT,
    slots         INTEGER NOT NULL,
    gpus          INTEGER NOT NULL,
    held_ms       INTEGER NOT NULL,
    lost_ms       INTEGER NOT NULL
);
CREATE INDEX lease_usage_job ON lease_usage (job_id);

-- Every path that grants, checkpoints or ends a lease goes through these triggers (see the
-- PostgreSQL migration). The nested UPDATEs touch neither state, token nor checkpoint_rows, so
-- they fire no trigger here.
CREATE TRIGGER shards_lease_start AFTER UPDATE OF state, token ON shards
    WHEN NEW.state = 'leased' AND (OLD.state <> 'leased' OR NEW.token <> OLD.token)
BEGIN
    UPDATE shards
    SET leased_at_ms = CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER),
        checkpoint_at_ms = NULL
    WHERE id = NEW.id;
END;

CREATE TRIGGER shards_checkpoint_time AFTER UPDATE OF checkpoint_rows ON shards
    WHEN NEW.checkpoint_rows <> OLD.checkpoint_rows
         AND NOT (NEW.state = 'leased' AND (OLD.state <> 'leased' OR NEW.token <> OLD.token))
BEGIN
    UPDATE shards
    SET checkpoint_at_ms = CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)
    WHERE id = NEW.id;
END;

CREATE TRIGGER shards_lease_usage AFTER UPDATE OF state, token ON shards
    WHEN OLD.state = 'leased' AND OLD.leased_at_ms IS NOT NULL
         AND (NEW.state <> 'leased' OR NEW.token <> OLD.token)
BEGIN
    INSERT INTO lease_usage
        (job_id, worker_id, instance_type, capacity_type, slots, gpus, held_ms, lost_ms)
    SELECT OLD.job_id, COALESCE(OLD.worker_id, ''),
           (SELECT instance_type FROM workers WHERE id = OLD.worker_id),
           (SELECT capacity_type FROM workers WHERE id = OLD.worker_id),
           COALESCE((SELECT slots FROM workers WHERE id = OLD.worker_id), 1),
           COALESCE((SELECT gpus FROM workers WHERE id = OLD.worker_id), 0),
           MAX(CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - OLD.leased_at_ms, 0),
           CASE WHEN NEW.state = 'done' THEN 0
                ELSE MAX(CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)
                         - COALESCE(OLD.checkpoint_at_ms, OLD.leased_at_ms), 0)
           END;
END;
