-- user_stats kept by the database from user_events (see README, PostgreSQL): every event
-- inserted into user_events adds itself to its user's row, in the same transaction. A row
-- counts exactly the events user_events holds for its user, whatever inserted them and
-- however often (a replayed event is not inserted again: insert_if_absent on event_id, and
-- the trigger sees only rows actually inserted), so it never goes backwards: not after
-- `eddy replay` or `eddy reset`, not with hosts sharing a group. The warehouse plugin no
-- longer writes user_stats itself.

-- No event inserted meanwhile: the rebuild below and the trigger see the same rows.
LOCK TABLE user_events IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE user_stats IN SHARE ROW EXCLUSIVE MODE;

-- Once, from what user_events holds (the rows before came from the plugin's state).
INSERT INTO user_stats AS s (user_id, total_events, total_purchases, total_spent,
                             last_active, last_purchase, updated_at)
SELECT user_id, count(*), count(*) FILTER (WHERE event_type = 'purchase'),
       coalesce(sum(amount) FILTER (WHERE event_type = 'purchase'), 0),
       max(timestamp), max(timestamp) FILTER (WHERE event_type = 'purchase'), now()
FROM user_events
GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET
    total_events = EXCLUDED.total_events,
    total_purchases = EXCLUDED.total_purchases,
    total_spent = EXCLUDED.total_spent,
    last_active = EXCLUDED.last_active,
    last_purchase = EXCLUDED.last_purchase,
    updated_at = now();

-- The events one statement inserted (not those it skipped as present), added to their
-- users' rows. Users in a fixed order, so that two writers never deadlock on their rows;
-- an increment of the row as it is when locked, so that concurrent writers add up.
CREATE OR REPLACE FUNCTION user_stats_add_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_stats AS s (user_id, total_events, total_purchases, total_spent,
                                 last_active, last_purchase, updated_at)
    SELECT user_id, count(*), count(*) FILTER (WHERE event_type = 'purchase'),
           coalesce(sum(amount) FILTER (WHERE event_type = 'purchase'), 0),
           max(timestamp), max(timestamp) FILTER (WHERE event_type = 'purchase'), now()
    FROM inserted
    GROUP BY user_id
    ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET
        total_events = s.total_events + EXCLUDED.total_events,
        total_purchases = s.total_purchases + EXCLUDED.total_purchases,
        total_spent = s.total_spent + EXCLUDED.total_spent,
        -- GREATEST skips NULLs.
        last_active = GREATEST(s.last_active, EXCLUDED.last_active),
        last_purchase = GREATEST(s.last_purchase, EXCLUDED.last_purchase),
        updated_at = now();
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS user_events_into_user_stats ON user_events;
CREATE TRIGGER user_events_into_user_stats
    AFTER INSERT ON user_events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION user_stats_add_events();
