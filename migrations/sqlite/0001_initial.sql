-- Jobs, their input snapshot, shards, parts and workers. Times are milliseconds since the
-- Unix epoch from the database clock.

CREATE TABLE jobs (
    id                      INTEGER PRIMARY KEY AUTOINCREMENT,
    uid                     TEXT    NOT NULL UNIQUE,
    name                    TEXT    NOT NULL,
    idempotency_key         TEXT    UNIQUE,
    spec_json               TEXT    NOT NULL,
    spec_hash               TEXT    NOT NULL,
    state                   TEXT    NOT NULL,
    priority                INTEGER NOT NULL DEFAULT 0,
    max_attempts            INTEGER NOT NULL,
    rows_total              INTEGER NOT NULL,
    output_uri              TEXT    NOT NULL,
    error                   TEXT,
    created_at_ms           INTEGER NOT NULL,
    started_at_ms           INTEGER,
    finished_at_ms          INTEGER,
    finalizer_owner         TEXT,
    finalizer_expires_at_ms INTEGER
);
CREATE INDEX jobs_name ON jobs (name);
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE input_files (
    job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    uri    TEXT    NOT NULL,
    size   INTEGER NOT NULL,
    etag   TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE shards (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    file_index          INTEGER NOT NULL,
    row_group_start     INTEGER NOT NULL,
    row_group_end       INTEGER NOT NULL,
    file_row_start      INTEGER NOT NULL,
    rows                INTEGER NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending',
    token               INTEGER NOT NULL DEFAULT 0,
    attempts            INTEGER NOT NULL DEFAULT 0,
    worker_id           TEXT,
    lease_expires_at_ms INTEGER,
    not_before_ms       INTEGER NOT NULL DEFAULT 0,
    checkpoint_rows     INTEGER NOT NULL DEFAULT 0,
    error_rows          INTEGER NOT NULL DEFAULT 0,
    error_class         TEXT,
    error               TEXT
);
-- Claims and the reaper scan only these; heartbeats touch lease_expires_at, which no index holds.
CREATE INDEX shards_pending ON shards (id) WHERE state = 'pending';
CREATE INDEX shards_leased ON shards (id) WHERE state = 'leased';
CREATE INDEX shards_job ON shards (job_id, state);

CREATE TABLE parts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    shard_id    INTEGER NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    token       INTEGER NOT NULL,
    row_start   INTEGER NOT NULL,
    rows        INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    uri         TEXT    NOT NULL,
    error_rows  INTEGER NOT NULL DEFAULT 0,
    error_uri   TEXT,
    error_bytes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (shard_id, row_start)
);
CREATE INDEX parts_job ON parts (job_id);

CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    last_seen_ms INTEGER NOT NULL
);
