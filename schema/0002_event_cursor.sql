-- Where `relay catch-up` stopped reading the Events API: Auth0's opaque offset, stored after each committed
-- batch so that the next run resumes after the last event it applied. One row per stream read.

CREATE TABLE event_cursors (
    stream     text PRIMARY KEY,
    cursor     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE event_cursors IS 'Events API offsets reached by relay catch-up; resume points, safe to delete (then use --since).';
