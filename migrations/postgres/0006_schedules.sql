-- Schedules: a job spec (TOML with {{ date }}-style variables) run at each fire time of a cron
-- expression in a time zone. `next_fire_at_ms` is the next fire time not yet handled; a pass of
-- any replica that finds it due makes its jobs and moves it on with a guarded update.
CREATE TABLE schedules (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE,
    cron            TEXT    NOT NULL,
    timezone        TEXT    NOT NULL,
    catch_up        TEXT    NOT NULL,
    spec            TEXT    NOT NULL,
    paused          BOOLEAN NOT NULL DEFAULT FALSE,
    next_fire_at_ms BIGINT ,
    created_at_ms   BIGINT  NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_fire_at_ms);

-- What each fire time made: its job (one per fire time, whichever replica made it: the job's
-- idempotency key names the schedule and the fire time), or why it made none.
CREATE TABLE schedule_fires (
    schedule_id BIGINT  NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at_ms  BIGINT  NOT NULL,
    job_id      BIGINT ,
    error       TEXT,
    PRIMARY KEY (schedule_id, fire_at_ms)
);
