-- The whole production domain: tenants, sessions, the records ledger, events and dead letters.
-- Applied by `gateway migrate` inside one transaction under an advisory lock.

CREATE TABLE companies (
    company_id  text PRIMARY KEY CHECK (length(company_id) BETWEEN 1 AND 128),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    auth0_id    text PRIMARY KEY CHECK (length(auth0_id) BETWEEN 1 AND 256),
    company_id  text NOT NULL REFERENCES companies (company_id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_company_idx ON users (company_id);

CREATE TABLE projects (
    project_id          text PRIMARY KEY CHECK (length(project_id) BETWEEN 1 AND 128),
    company_id          text NOT NULL REFERENCES companies (company_id),
    name                text NOT NULL,
    timezone            text NOT NULL,
    sampling_unit       text NOT NULL DEFAULT 'unit',
    price_per_unit      numeric NOT NULL DEFAULT 0 CHECK (price_per_unit >= 0),
    bonus               jsonb,
    max_duration_hours  double precision NOT NULL DEFAULT 12 CHECK (max_duration_hours > 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX projects_company_idx ON projects (company_id);

CREATE TABLE sectors (
    project_id   text NOT NULL REFERENCES projects (project_id) ON DELETE CASCADE,
    sector_id    text NOT NULL CHECK (length(sector_id) BETWEEN 1 AND 128),
    sector_name  text NOT NULL,
    PRIMARY KEY (project_id, sector_id)
);

-- Every change of what a session's retained state shows takes a new tick (assigned under the
-- row lock, so later changes have larger ticks) and records its transaction id: the state
-- publisher follows transaction ids past the snapshot xmin, so it never misses a change that
-- committed late, and skips versions it already published by tick.
CREATE SEQUENCE session_state_tick;

CREATE TABLE production_sessions (
    session_id          text PRIMARY KEY,
    company_id          text NOT NULL REFERENCES companies (company_id),
    project_id          text NOT NULL REFERENCES projects (project_id),
    owner_id            text NOT NULL REFERENCES users (auth0_id),
    sector_id           text,
    sector_name         text,
    timezone            text NOT NULL,
    day                 date NOT NULL,
    status              text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    close_reason        text CHECK (close_reason IN ('closed', 'expired')),
    opened_at           timestamptz NOT NULL,
    closed_at           timestamptz,
    max_duration_hours  double precision NOT NULL CHECK (max_duration_hours > 0),
    expires_at          timestamptz NOT NULL,
    sampling_unit       text NOT NULL,
    price_per_unit      numeric NOT NULL CHECK (price_per_unit >= 0),
    bonus               jsonb,
    notes               text,
    -- bumped by every change that decides whether records may enter (close, expire, extend);
    -- record inserts are guarded by it, so a decision made on a stale snapshot never commits
    version             bigint NOT NULL DEFAULT 1,
    -- totals, maintained in the same transaction as the ledger rows that change them
    total_units         numeric NOT NULL DEFAULT 0,
    total_records       bigint NOT NULL DEFAULT 0,
    total_voided        bigint NOT NULL DEFAULT 0,
    total_workers       integer NOT NULL DEFAULT 0,
    state_tick          bigint NOT NULL DEFAULT nextval('session_state_tick'),
    state_xid           bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'open') = (closed_at IS NULL)),
    CHECK ((status = 'open') = (close_reason IS NULL))
);
-- one open session per (company, project, day, sector); a missing sector counts as one value
CREATE UNIQUE INDEX production_sessions_one_open_idx
    ON production_sessions (company_id, project_id, day, sector_id) NULLS NOT DISTINCT
    WHERE status = 'open';
CREATE INDEX production_sessions_expiry_idx ON production_sessions (expires_at)
    WHERE status = 'open';
CREATE INDEX production_sessions_owner_idx ON production_sessions (owner_id);
CREATE INDEX production_sessions_state_xid_idx ON production_sessions (state_xid);

CREATE TABLE session_worker_totals (
    session_id  text NOT NULL REFERENCES production_sessions (session_id) ON DELETE CASCADE,
    worker_id   text NOT NULL,
    units       numeric NOT NULL DEFAULT 0,
    records     bigint NOT NULL DEFAULT 0,
    voided      bigint NOT NULL DEFAULT 0,
    -- records added by the latest batch: lets that batch tell, from the row alone, whether
    -- the worker just gained their first record that is not voided (no join needed)
    last_added  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, worker_id)
);

-- The ledger. A record is never updated except to mark it voided; a void is a counter-movement
-- row with the negative units of the record it cancels.
CREATE TABLE production_records (
    record_id        text PRIMARY KEY,
    -- the session's company, copied (the session's own foreign key vouches for it)
    company_id       text NOT NULL,
    session_id       text NOT NULL REFERENCES production_sessions (session_id),
    owner_id         text NOT NULL,
    worker_id        text NOT NULL,
    worker_name      text NOT NULL,
    units            numeric NOT NULL,
    recorded_at      timestamptz NOT NULL,
    client_event_id  text,
    idempotency_key  text,
    kind             text NOT NULL DEFAULT 'record' CHECK (kind IN ('record', 'void')),
    state            text NOT NULL DEFAULT 'inserted' CHECK (state IN ('inserted', 'voided')),
    void_of          text REFERENCES production_records (record_id),
    void_reason      text,
    voided_by        text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- the idempotency key client:{sessionId}:{workerId}:{clientEventId}
    CONSTRAINT production_records_client_event_key
        UNIQUE (session_id, worker_id, client_event_id),
    CHECK ((kind = 'record') = (client_event_id IS NOT NULL)),
    CHECK ((kind = 'void') = (void_of IS NOT NULL)),
    CHECK (kind = 'void' OR units >= 0),
    CHECK (kind = 'record' OR state = 'inserted'),
    CHECK ((state = 'voided') = (voided_by IS NOT NULL))
);
-- an optional idempotencyKey is unique per company; a record is voided at most once
-- (partial: the many rows without one cost no index entry)
CREATE UNIQUE INDEX production_records_idempotency_key
    ON production_records (company_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX production_records_void_of_key
    ON production_records (void_of) WHERE void_of IS NOT NULL;

-- Transactional outbox: written with the change, published after commit, marked after PUBACK.
CREATE TABLE session_events (
    seq           bigserial PRIMARY KEY,
    event_id      text NOT NULL UNIQUE,
    session_id    text NOT NULL,
    type          text NOT NULL,
    at            timestamptz NOT NULL DEFAULT now(),
    data          jsonb NOT NULL,
    published_at  timestamptz
);
CREATE INDEX session_events_pending_idx ON session_events (seq) WHERE published_at IS NULL;
CREATE INDEX session_events_session_idx ON session_events (session_id, seq);

-- How far the (single, elected) publisher has followed session_state_tick.
CREATE TABLE publisher_cursors (
    name        text PRIMARY KEY,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Everything a device sent that was refused, so nothing is lost without trace.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    topic         text NOT NULL,
    reason        text NOT NULL,
    message       text,
    auth0_id      text,
    payload       bytea NOT NULL,
    payload_size  integer NOT NULL,
    truncated     boolean NOT NULL DEFAULT false
);
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at);
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, received_at);
