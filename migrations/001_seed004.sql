-- Seed 004's tables, written by the warehouse plugin through PostgreSQL outputs
-- (see README, PostgreSQL). Applied once by `eddy migrate --config plugins.toml`, or by the
-- host at start with `[postgres.NAME] migrate_on_start = true`; `IF NOT EXISTS` throughout,
-- so it also applies over tables made by hand.

-- One row per event, deduplicated on event_id (insert_if_absent).
CREATE TABLE IF NOT EXISTS user_events (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    event_id    VARCHAR(100) UNIQUE NOT NULL,
    user_id     VARCHAR(100) NOT NULL,
    event_type  VARCHAR(50),
    timestamp   TIMESTAMPTZ NOT NULL,
    session_id  VARCHAR(100),
    page_url    TEXT,
    amount      NUMERIC(12, 2),
    duration    DOUBLE PRECISION,
    metadata    JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_events_user_time ON user_events (user_id, timestamp);
CREATE INDEX IF NOT EXISTS user_events_type_time ON user_events (event_type, timestamp);

-- Per-user KPIs (kept from user_events by 002_user_stats_from_events.sql).
CREATE TABLE IF NOT EXISTS user_stats (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          VARCHAR(100) UNIQUE NOT NULL,
    total_events     INTEGER NOT NULL,
    total_purchases  INTEGER NOT NULL,
    total_spent      NUMERIC(14, 2) NOT NULL,
    last_active      TIMESTAMPTZ,
    last_purchase    TIMESTAMPTZ,
    avg_session_duration DOUBLE PRECISION,
    engagement_score DOUBLE PRECISION,
    churn_risk       DOUBLE PRECISION,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_stats_last_active ON user_stats (last_active);

-- Dead letters (`[[plugin]] dead_letter_table`), one row per dead letter whatever how often
-- it was written (insert_if_absent on dedup_key: plugin and source coordinates, or for an
-- output record its output and payload digest). The host writes status 'dead' (it gave up);
-- the other statuses are for whoever works the queue.
CREATE TABLE IF NOT EXISTS dead_letter_queue (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    dedup_key        TEXT UNIQUE NOT NULL,
    event_id         VARCHAR(100),
    event_data       JSONB,
    error_type       VARCHAR(100),
    error_message    TEXT,
    retry_count      INTEGER NOT NULL DEFAULT 0,
    status           VARCHAR(20) NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'retrying', 'dead', 'resolved')),
    plugin           TEXT,
    plugin_version   TEXT,
    output           TEXT,
    source_topic     TEXT,
    source_partition INTEGER,
    source_offset    BIGINT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dead_letter_queue_created ON dead_letter_queue (created_at);
CREATE INDEX IF NOT EXISTS dead_letter_queue_status ON dead_letter_queue (status);
