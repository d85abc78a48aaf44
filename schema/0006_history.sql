-- History, kept when RELAY_HISTORY=on: the object of every user event the relay merged (applied,
-- tombstoned or stale: arrival order does not matter, only the versions do), and every export row, as a
-- snapshot versioned by its updated_at (event_id 'backfill'). Insert-only; written in the same transaction as
-- the ledger; pruned by `relay prune --older-than` by event time.
CREATE TABLE user_events (
    user_id    text NOT NULL,
    event_time timestamptz NOT NULL,
    -- The event's id: with event_time, the version that orders a user's history ('backfill' for a row).
    event_id   text NOT NULL,
    event_type text NOT NULL,
    -- A full snapshot replaces the profile; any other object is merged over it (see relay/handlers.py).
    replaces   boolean NOT NULL,
    object     jsonb NOT NULL,
    PRIMARY KEY (user_id, event_time, event_id)
);

CREATE INDEX user_events_time_idx ON user_events (event_time);

COMMENT ON TABLE user_events IS 'Every user event object the relay merged, and every export row loaded, when RELAY_HISTORY=on; insert-only.';

-- The profile after each of a user's events, folded in version order as the relay merges them: a snapshot
-- replaces, any other object is merged over the profile, field by field.
CREATE FUNCTION relay_history_fold(profile jsonb, object jsonb, replaces boolean) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN replaces OR profile IS NULL THEN object ELSE profile || object END
$$;

CREATE AGGREGATE relay_history_profile(jsonb, boolean) (
    SFUNC = relay_history_fold,
    STYPE = jsonb
);

CREATE VIEW user_history AS
    SELECT user_id,
           event_time AS valid_from,
           lead(event_time) OVER versions AS valid_to,
           event_id,
           event_type AS type,
           relay_history_profile(object, replaces) OVER versions AS profile
      FROM user_events
    WINDOW versions AS (PARTITION BY user_id ORDER BY event_time, event_id);

COMMENT ON VIEW user_history IS 'Each user''s profile after each event, in version order: valid from the event''s time until the next one''s (NULL: still valid).';
