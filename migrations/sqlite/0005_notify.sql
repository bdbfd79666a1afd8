-- Completion callbacks: one per job that names a URL, pending until the receiver acknowledges
-- the POST of the job's final status (delivered) or its deadline passes (abandoned). A retried
-- job's callback is pending again. `next_at_ms` is when it may be tried next; a try in flight
-- holds it for a while, so one replica posts at a time.
CREATE TABLE notifications (
    job_id     INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    url        TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX notifications_due ON notifications (state, next_at_ms);

-- Every POST made, with its answer (a status, or why none came).
CREATE TABLE notification_attempts (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL,
    status  INTEGER,
    error   TEXT
);
CREATE INDEX notification_attempts_job ON notification_attempts (job_id, id);
