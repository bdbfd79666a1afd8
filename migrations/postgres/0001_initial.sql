-- Jobs, their input snapshot, shards, parts and workers. Times are milliseconds since the
-- Unix epoch from the database clock (ns_now_ms()).

-- The database clock as the current statement started: one value for every row a statement
-- touches, and truly STABLE, so the planner may inline it. Store transactions last one method
-- call, so the start of the statement is "now". Hot statements still compare against
-- `(SELECT ns_now_ms())`, which PostgreSQL evaluates once, not once per row scanned.
CREATE FUNCTION ns_now_ms() RETURNS BIGINT LANGUAGE sql STABLE AS
$$ SELECT (extract(epoch FROM statement_timestamp()) * 1000)::BIGINT $$;

CREATE TABLE jobs (
    id                      BIGSERIAL PRIMARY KEY,
    uid                     TEXT    NOT NULL UNIQUE,
    name                    TEXT    NOT NULL,
    idempotency_key         TEXT    UNIQUE,
    spec_json               TEXT    NOT NULL,
    spec_hash               TEXT    NOT NULL,
    state                   TEXT    NOT NULL,
    priority                BIGINT  NOT NULL DEFAULT 0,
    max_attempts            BIGINT  NOT NULL,
    rows_total              BIGINT  NOT NULL,
    output_uri              TEXT    NOT NULL,
    error                   TEXT,
    created_at_ms           BIGINT  NOT NULL,
    started_at_ms           BIGINT,
    finished_at_ms          BIGINT,
    finalizer_owner         TEXT,
    finalizer_expires_at_ms BIGINT
);
CREATE INDEX jobs_name ON jobs (name);
CREATE INDEX jobs_state ON jobs (state);

CREATE TABLE input_files (
    job_id BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    BIGINT  NOT NULL,
    uri    TEXT    NOT NULL,
    size   BIGINT  NOT NULL,
    etag   TEXT,
    PRIMARY KEY (job_id, idx)
);

-- fillfactor leaves room on each page so heartbeat and checkpoint updates stay HOT.
CREATE TABLE shards (
    id                  BIGSERIAL PRIMARY KEY,
    job_id              BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    file_index          BIGINT  NOT NULL,
    row_group_start     BIGINT  NOT NULL,
    row_group_end       BIGINT  NOT NULL,
    file_row_start      BIGINT  NOT NULL,
    rows                BIGINT  NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending',
    token               BIGINT  NOT NULL DEFAULT 0,
    attempts            BIGINT  NOT NULL DEFAULT 0,
    worker_id           TEXT,
    lease_expires_at_ms BIGINT,
    not_before_ms       BIGINT  NOT NULL DEFAULT 0,
    checkpoint_rows     BIGINT  NOT NULL DEFAULT 0,
    error_rows          BIGINT  NOT NULL DEFAULT 0,
    error_class         TEXT,
    error               TEXT
) WITH (fillfactor = 70);
-- Claims and the reaper scan only these; heartbeats touch lease_expires_at, which no index holds.
CREATE INDEX shards_pending ON shards (id) WHERE state = 'pending';
CREATE INDEX shards_leased ON shards (id) WHERE state = 'leased';
CREATE INDEX shards_job ON shards (job_id, state);

CREATE TABLE parts (
    id          BIGSERIAL PRIMARY KEY,
    job_id      BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    shard_id    BIGINT  NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    token       BIGINT  NOT NULL,
    row_start   BIGINT  NOT NULL,
    rows        BIGINT  NOT NULL,
    bytes       BIGINT  NOT NULL,
    uri         TEXT    NOT NULL,
    error_rows  BIGINT  NOT NULL DEFAULT 0,
    error_uri   TEXT,
    error_bytes BIGINT  NOT NULL DEFAULT 0,
    UNIQUE (shard_id, row_start)
);
CREATE INDEX parts_job ON parts (job_id);

CREATE TABLE workers (
    id           TEXT   PRIMARY KEY,
    last_seen_ms BIGINT NOT NULL
);
