-- The guide's table, in the schema on the search path.
CREATE TABLE users (
    user_id              text PRIMARY KEY,
    email                text,
    name                 text,
    nickname             text,
    created_at           timestamptz,
    updated_at           timestamptz,
    raw_user             jsonb,
    last_event_processed timestamptz
);
